"""``benchmarks/compute_report.py``: accuracy against compute, gains at equal compute and at
convergence, on made-up summaries whose answers are known."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ROOT


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "compute_report", ROOT / "benchmarks" / "compute_report.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(label: str, epochs: int, tests: list[float], vals: list[float]) -> dict:
    runs = [
        {
            "label": label,
            "config": {"epochs": epochs, "seed": seed},
            "final_test_accuracy": t,
            "final_val_accuracy": v,
            "train_time_s": 10.0 * epochs,
            "num_train": 100,
        }  # fmt: skip
        for seed, (t, v) in enumerate(zip(tests, vals))
    ]
    return {"runs": runs}


SUMMARIES = [
    _summary("single", 60, [0.50, 0.52], [0.48, 0.50]),
    _summary("single", 120, [0.53, 0.55], [0.51, 0.53]),
    _summary("single", 240, [0.54, 0.54], [0.50, 0.50]),  # validation prefers 120
    _summary("transform", 60, [0.56, 0.57], [0.55, 0.55]),
    _summary("transform", 120, [0.57, 0.59], [0.54, 0.54]),  # validation prefers 60
    _summary("transform-onehalf", 60, [0.52, 0.53], [0.50, 0.51]),
]


def test_points_gains_and_outputs(tmp_path: Path) -> None:
    report = _module()
    data = report.points(SUMMARIES)
    assert data["transform"][60]["passes"] == 60 * 100 * 4  # four images a step per image
    assert data["transform-onehalf"][60]["passes"] == 60 * 100 * 1.5
    assert report.best_within(data["single"], 60 * 100 * 4) == 120  # 60, 120, 240 fit
    gains = report.gains(data)
    # transform at 60 epochs (24000 passes) against single at <= 24000 passes: 60, 120 or
    # 240 (240 x 100 = 24000), the one validation prefers: 120
    eq = gains["transform"]["equal_compute"][0]
    assert eq["epochs"] == 60 and eq["single_epochs"] == 120 and eq["paired"]
    assert eq["mean"] == pytest.approx(((0.56 - 0.53) + (0.57 - 0.55)) / 2)
    # at convergence: transform at 60 (its best validation) against single at 120
    conv = gains["transform"]["convergence"]
    assert (conv["epochs"], conv["single_epochs"]) == (60, 120)
    assert conv["mean"] == pytest.approx(0.025) and conv["converged"]
    # one budget only: validation's choice is the longest run, so convergence is not shown
    assert not gains["transform-onehalf"]["convergence"]["converged"]
    # the cheap form (9000 passes) may only compare with single at 60 (6000 passes)
    assert gains["transform-onehalf"]["equal_compute"][0]["single_epochs"] == 60
    summaries = []
    for i, s in enumerate(SUMMARIES):
        path = tmp_path / f"s{i}.json"
        path.write_text(json.dumps(s))
        summaries.append(str(path))
    out = report.main(
        [
            *summaries,
            "--md",
            str(tmp_path / "t.md"),
            "--json",
            str(tmp_path / "c.json"),
            "--plot",
            str(tmp_path / "c.png"),
        ]  # fmt: skip
    )
    assert out["transform"]["convergence"]["mean"] == pytest.approx(0.025)
    text = (tmp_path / "t.md").read_text()
    assert text.startswith("# Accuracy against compute\n")  # a titled page for the docs
    assert "| transform-onehalf |" in text and "(not shown: a longest budget run" in text
    assert "| transform | 60 | 2 | 56.50 ± 0.71 |" in text and "+2.50 ± 0.71 (2 seeds)" in text
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["points"]["single"]["240"]["passes"] == 24000
    assert (tmp_path / "c.png").stat().st_size > 0


def test_title_names_the_page_and_its_figure(tmp_path: Path) -> None:
    path = tmp_path / "s0.json"
    path.write_text(json.dumps(SUMMARIES[0]))
    md = tmp_path / "ft.md"
    report = _module()
    report.main([str(path), "--md", str(md), "--title", "Fine-tuning: accuracy against compute"])
    text = md.read_text()
    assert text.startswith("# Fine-tuning: accuracy against compute\n\nWritten by")
    assert "the figure is" not in text  # no --plot, no figure named
    report.main([str(path), "--md", str(md), "--plot", str(tmp_path / "f.png")])
    assert md.read_text().startswith("# Accuracy against compute\n")
    assert f"the figure is `{tmp_path / 'f.png'}`" in md.read_text()


def test_a_long_title_stays_inside_the_figure() -> None:
    import matplotlib.pyplot as plt

    report = _module()
    data = report.points(SUMMARIES)
    title = "Fine-tuning a small ResNet: accuracy against compute"
    fig = report.figure(data, title)
    try:
        fig.canvas.draw()
        box = fig.axes[0].title.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)
        assert fig.axes[0].get_title() == f"{title}\n(numbers: epochs)"
    finally:
        plt.close(fig)


def test_gains_against_another_base_name_it_in_the_table() -> None:
    report = _module()
    data = report.points(SUMMARIES)
    res = report.gains(data, base="transform")
    # single at 60 and 120 (6000, 12000 passes): no transform budget fits, so only single
    # at 240 (24000) compares, with transform at 60 (24000), paired: 0.54-0.56, 0.54-0.57
    [eq] = res["single"]["equal_compute"]
    assert (eq["epochs"], eq["transform_epochs"]) == (240, 60)
    assert eq["mean"] == pytest.approx(-0.025)
    text = report.table(data, res, base="transform")
    assert "gain at equal compute (its epochs vs transform's)" in text
    assert "240 vs 60: -2.50 ± 0.71" in text


def test_budgets_run_on_different_seeds_are_chosen_on_the_seeds_they_share() -> None:
    report = _module()
    # 60 epochs on seeds 0-1 (validation 0.50, 0.60: mean 0.55); 120 epochs on seed 0 only
    # (0.52). Over each one's own seeds 60 wins (0.55 > 0.52); on the seed both ran, 120 does
    # (0.52 > 0.50).
    runs = _summary("transform", 60, [0.56, 0.57], [0.50, 0.60])["runs"]
    runs += _summary("transform", 120, [0.58], [0.52])["runs"]
    data = report.points([{"runs": runs}, SUMMARIES[0]])
    assert report.preferred(data["transform"], [60, 120]) == 120
    assert report.best_within(data["transform"], 60 * 100 * 4) == 60  # 120 does not fit
    conv = report.gains(data)["transform"]["convergence"]
    assert conv["epochs"] == 120 and conv["seeds"] == [0]  # paired with single on seed 0
    assert conv["mean"] == pytest.approx(0.58 - 0.50)
    # no seed in common: each budget's own mean (0.55 against 0.52)
    runs[2]["config"]["seed"] = 5
    data = report.points([{"runs": runs}])
    assert report.preferred(data["transform"], [60, 120]) == 60


def test_table_names_the_seeds_a_gain_rests_on() -> None:
    report = _module()
    runs = _summary("transform", 60, [0.56, 0.57], [0.55, 0.55])["runs"]
    runs += _summary("transform-one", 60, [0.52], [0.50])["runs"]  # seed 0 only
    late = _summary("batchaug", 60, [0.51], [0.49])["runs"]
    late[0]["config"]["seed"] = 7  # no seed in common with single
    data = report.points([{"runs": runs + late}, SUMMARIES[0]])
    text = report.table(data, report.gains(data))
    assert "| transform-one | 60 | 1 | 52.00 | 50.0 |" in text  # one seed: no spread shown
    assert "60 vs 60: +2.00 (seed 0 only)" in text  # 0.52 - 0.50 on seed 0
    assert "60 vs 60: +0.00 (unpaired: no seed in common)" in text  # 0.51 - mean(0.50, 0.52)
    assert "60 vs 60: +5.50 ± 0.71 (2 seeds)" in text


def _tune(picks: dict[str, str]) -> dict:
    """A lowdata_tune.py summary of the regime of SUMMARIES (60 epochs), two settings."""
    row = {"method": "transform-onehalf", "seeds": [0, 1], "wall_time_mean_s": 700.0}
    return {
        "regime": "toy",
        "base_args": ["--dataset", "cifar100", "--epochs", "30", "--augment"],
        "picks": picks,
        "rows": [
            {**row, "setting": "default", "args": ["--epochs", "60"],
             "test_accuracies": [0.52, 0.53], "val_accuracies": [0.50, 0.51]},
            {**row, "setting": "aw0.3", "args": ["--epochs", "60", "--aux-weight", "0.3"],
             "test_accuracies": [0.55, 0.58], "val_accuracies": [0.53, 0.52]},
        ],
    }  # fmt: skip


def test_tuned_rows_join_at_the_setting_validation_picked(tmp_path: Path) -> None:
    report = _module()
    data = report.points(SUMMARIES)
    tuned = report.tuned_points([_tune({"transform-onehalf": "aw0.3"})], data)
    assert list(tuned) == ["transform-onehalf (aw0.3)"]
    point = tuned["transform-onehalf (aw0.3)"][60]  # the row's --epochs overrides the base's
    assert point["seeds"] == {0: (0.55, 0.53), 1: (0.58, 0.52)}
    assert point["passes"] == 60 * 100 * 1.5
    gains = report.gains({**data, **tuned})
    eq = gains["transform-onehalf (aw0.3)"]["equal_compute"][0]  # against single at 60
    assert eq["single_epochs"] == 60 and eq["mean"] == pytest.approx(0.055)
    # a default pick is the method's own point: nothing to add
    assert report.tuned_points([_tune({"transform-onehalf": "default"})], data) == {}
    with pytest.raises(ValueError, match="number of training images"):
        report.tuned_points([_tune({"transform-onehalf": "aw0.3"})], {})
    paths = []
    for i, s in enumerate([*SUMMARIES, _tune({"transform-onehalf": "aw0.3"})]):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(s))
    md = tmp_path / "t.md"
    argv = [*map(str, paths[:-1]), "--tuned", str(paths[-1]), "--md", str(md)]
    out = report.main([*argv, "--methods", "single", "transform-onehalf"])
    assert set(out) == {"transform-onehalf", "transform-onehalf (aw0.3)"}
    assert "| transform-onehalf (aw0.3) | 60 | 2 | 56.50 ± 2.12 | 52.5 ± 0.7 | 0.01 | 700 |" in (
        md.read_text()
    )
    assert "settings `lowdata_tune.py` chose on validation" in md.read_text()
    assert "transform-onehalf (aw0.3)" not in report.main([*argv, "--methods", "single"])
    assert "chose on validation" not in md.read_text()  # none of the tuned rows is shown
