"""The penalty weights of the tiny 10-task tables, chosen on the validation split.

For each method with a penalty weight (ITA: α of Eq. 12, IEL: β of Eq. 19; IEL's still rose at
the grid's last value, 10⁶, by less than the noise of its 1000 validation images, and the grid
stops there) and each tuning style
of the asserted rows, :func:`grid_search` trains seed 0 on ``tiny10`` at every value of
:data:`GRID` and scores the full composition on the **validation** split
(:func:`compolab.measure.composed_accuracy`); the test split is never read. :func:`choose` keeps
the best value per method (the mean over the styles, so one weight serves every style of the
preset), and ``python -m compolab.reproduce.grid`` writes the grid and the choice to
``figures/tables/hparams.md`` / ``.json`` (read by the README and notebook 06). The chosen values
are the ``tiny10`` entry of the tiny preset (``compolab.config.PRESETS``).
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from compolab.io import write_json
from compolab.methods.ita_iel import IEL, ITA
from compolab.reproduce.runs import init_worker, job_run
from compolab.run import run_config

__all__ = ["GRID", "STYLES", "grid_search", "choose", "format_grid"]

#: ``(method, field) -> values`` of the search.
GRID: dict[tuple[str, str], tuple[float, ...]] = {(ITA.name, "alpha"): (1e2, 1e3, 1e4, 1e5),
                                                   (IEL.name, "beta"): (1e2, 1e3, 1e4, 1e5, 1e6)}  # fmt: skip
#: ``preset -> grid``: real-small's α still rose at 10⁵, so its grid goes on to 10⁷.
GRIDS: dict[str, dict[tuple[str, str], tuple[float, ...]]] = {
    "tiny": GRID, "real-small": {**GRID, (ITA.name, "alpha"): (1e2, 1e3, 1e4, 1e5, 1e6, 1e7)}}
#: Tuning styles of the search (the styles of the asserted rows).
STYLES: tuple[str, ...] = ("lora", "full")
#: Dataset, tasks and epochs of the search: those of ``compolab reproduce`` on the tiny preset.
DATASET, EPOCHS = "tiny10", 3
#: ``preset -> (dataset, epochs)`` of the search (None: the preset's own); ``real-small``'s is
#: written to ``figures/tables/hparams-real-small.md`` and read by its preset entry.
SEARCHES: dict[str, tuple[str | None, int | None]] = {"tiny": (DATASET, EPOCHS), "real-small": (None, None)}


def _configs(preset: str = "tiny"):
    dataset, epochs = SEARCHES[preset]
    for (method, field), values in GRIDS[preset].items():
        for style in STYLES:
            for value in values:
                rc = run_config(method, style, preset=preset, dataset=dataset, epochs=epochs,
                                **{field: value})  # fmt: skip
                yield method, field, style, value, rc


def _score(config: dict, out: str) -> float:
    """Train (or reuse) one grid run; its validation FA (%)."""
    from compolab.measure import composed_accuracy

    job_run(config, out)
    return composed_accuracy(out, "val")


def grid_search(cache: str | Path = "runs/grid", workers: int = 2, preset: str = "tiny") -> list[dict]:
    """Every grid point's validation FA, in :data:`GRID` order (runs cached in ``cache``)."""
    points = list(_configs(preset))
    with ProcessPoolExecutor(workers, initializer=init_worker) as pool:
        futures = [pool.submit(_score, rc.to_json(), str(Path(cache) / f"{m}-{s}-{f}{v:g}"))
                   for m, f, s, v, rc in points]  # fmt: skip
        return [{"method": m, "field": f, "style": s, "value": v, "val_fa": round(fut.result(), 2)}
                for (m, f, s, v, _), fut in zip(points, futures, strict=True)]  # fmt: skip


def choose(rows: list[dict], preset: str = "tiny") -> dict[str, dict]:
    """``method -> {"field": ..., "value": ...}``: the value of the best mean validation FA over styles."""
    out = {}
    for (method, field), values in GRIDS[preset].items():
        mean = {v: statistics.mean(r["val_fa"] for r in rows if r["method"] == method and r["value"] == v)
                for v in values}  # fmt: skip
        out[method] = {"field": field, "value": max(values, key=lambda v: (mean[v], -values.index(v)))}
    return out


def format_grid(rows: list[dict], chosen: dict[str, dict], preset: str = "tiny") -> str:
    """The grid as a Markdown table: one row per method and value, one column per style."""
    title = "the tiny 10-task tables" if preset == "tiny" else f"the {preset} preset"
    lines = [
        f"**Penalty weights of {title}: validation FA (%) of the composition, seed 0**",
        "",
        f"| method | weight | {' | '.join(STYLES)} | mean |",
        "|---|---|" + "---|" * (len(STYLES) + 1),
    ]
    for (method, field), values in GRIDS[preset].items():
        for v in values:
            fa = [next(r["val_fa"] for r in rows if (r["method"], r["style"], r["value"]) == (method, s, v))
                  for s in STYLES]  # fmt: skip
            mark = " (chosen)" if chosen[method]["value"] == v else ""
            lines.append(
                f"| {method.upper()} | {field} = {v:g}{mark} | "
                + " | ".join(f"{x:.1f}" for x in fa)
                + f" | {statistics.mean(fa):.1f} |"
            )
    dataset, epochs = SEARCHES[preset]
    where = (f"{dataset}, {epochs} epochs per task, the preset's other values; validation split only "
             "(10 images per class). Made by `python -m compolab.reproduce.grid`.") if preset == "tiny" else (
             f"The {preset} preset's benchmark and epochs; validation split only. Made by "
             f"`python -m compolab.reproduce.grid --preset {preset}`.")  # fmt: skip
    lines += ["", where]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="runs/grid")
    p.add_argument("--out", default="figures/tables")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preset", default="tiny", choices=sorted(SEARCHES))
    args = p.parse_args(argv)
    rows = grid_search(args.cache, args.workers, args.preset)
    chosen = choose(rows, args.preset)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = "hparams" if args.preset == "tiny" else f"hparams-{args.preset}"
    write_json(Path(args.out) / f"{stem}.json", {"grid": rows, "chosen": chosen})
    (Path(args.out) / f"{stem}.md").write_text(format_grid(rows, chosen, args.preset), encoding="utf-8")
    print(format_grid(rows, chosen, args.preset))


if __name__ == "__main__":
    main()
