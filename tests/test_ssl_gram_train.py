"""Gram anchoring in the training loop: teacher sources, refresh bookkeeping across resume, hi-res crops,
the dense-feature monitor's output in the run folder."""

import json
import math

import pytest
import torch

from dinoapp.errors import ConfigError
from dinoapp.ssl import runstate
from dinoapp.ssl.config import load_config
from dinoapp.ssl.train import build_networks, pretrain, schedule_values
from tests.test_ssl_train import QUIET, _final_state, _flat, data_dir  # noqa: F401  (module fixture)

GRAM = [*QUIET, "gram.enabled=true", "gram.teacher=ema", "gram.start=3", "gram.ramp_steps=2",
        "gram.refresh_every=4", "gram.max_refreshes=1", "gram.highres=2", "run.keep_last=20"]  # fmt: skip


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_gram_schedule_values():
    cfg = load_config("cpu-smoke", ["gram.enabled=true", "gram.start=10", "gram.ramp_steps=10", "gram.weight=2",
                                    "gram.dino_local_end=0.5", "train.steps=30"])  # fmt: skip
    v = {s: schedule_values(cfg, s) for s in (0, 10, 15, 20, 30)}
    assert v[0]["gram_weight"] == 0 and v[10]["gram_weight"] == 0 and v[20]["gram_weight"] == pytest.approx(2.0)
    assert v[15]["gram_weight"] == pytest.approx(1.0)  # half-way up the cosine ramp
    assert v[0]["dino_local_scale"] == 1 and v[20]["dino_local_scale"] == pytest.approx(0.75)
    assert v[30]["dino_local_scale"] == pytest.approx(0.5)
    off = load_config("cpu-smoke", ["train.steps=30"])
    assert schedule_values(off, 20)["gram_weight"] == 0 and schedule_values(off, 20)["dino_local_scale"] == 1


@pytest.mark.slow
def test_gram_ema_teacher_refresh_survives_resume(data_dir, tmp_path):  # noqa: F811
    """The Gram teacher is copied from the EMA teacher before step indices 3 and 7 (after 3 and 7 completed
    steps); a run stopped inside the Gram phase (after 5 steps) and resumed ends bit-identical to an
    uninterrupted one, refresh bookkeeping included."""
    full = tmp_path / "full"
    ov = [*GRAM, "train.steps=9", "run.ckpt_every=1"]
    pretrain("cpu-smoke", full, data=data_dir, overrides=ov)
    states = {s: runstate.load_checkpoint(p) for s, p in runstate.list_checkpoints(full)}
    assert [states[s]["gram_copies"] for s in range(1, 10)] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert states[3]["gram_teacher"] is None
    # copy 1 is the EMA teacher as it was before step index 3 (= after 3 completed steps)
    t3 = {k.removeprefix("backbone."): v for k, v in states[3]["teacher"].items() if k.startswith("backbone.")}
    assert all(torch.equal(states[4]["gram_teacher"][k], v) for k, v in t3.items())
    assert all(torch.equal(states[7]["gram_teacher"][k], states[4]["gram_teacher"][k]) for k in t3)  # fixed between
    qkv = "vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(states[8]["gram_teacher"][qkv], states[7]["gram_teacher"][qkv])  # refreshed
    rows = _rows(full)  # the weight ramps from 0 at step index 3: the term first counts at index 4
    assert "gram" not in rows[3] and rows[4]["gram"] > 0 and all(math.isfinite(r["loss"]) for r in rows)

    split = tmp_path / "split"
    pretrain("cpu-smoke", split, data=data_dir, overrides=ov, stop_after=5)
    pretrain(None, split, resume=True)
    a, b = _flat(_final_state(full)), _flat(_final_state(split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _final_state(full), _final_state(split)
    assert sa["gram_copies"] == sb["gram_copies"] == 2
    assert all(torch.equal(sa["gram_teacher"][k], sb["gram_teacher"][k]) for k in sa["gram_teacher"])


def test_gram_fixed_teachers(data_dir, tmp_path, tiny_meta_file, tiny_sd):  # noqa: F811
    """teacher=init anchors to the starting weights; a checkpoint path loads that backbone (any width)."""
    run = tmp_path / "init"
    ov = [*QUIET, "train.steps=2", f"model.backbone={tiny_meta_file}", "model.arch_overrides={}",
          "gram.enabled=true", "gram.teacher=init"]  # fmt: skip
    pretrain("cpu-smoke", run, data=data_dir, overrides=ov)
    assert _final_state(run)["gram_teacher"] is None  # rebuilt from the config on resume, not stored
    from dinoapp.ssl.dist import DistInfo
    from dinoapp.ssl.train import build_engine

    cfg = load_config("cpu-smoke", ov)
    gt = build_engine(cfg, DistInfo()).gram_teacher.state_dict()
    torch.testing.assert_close(gt["vit.blocks.1.attn.qkv.weight"], tiny_sd["blocks.1.attn.qkv.weight"])
    assert _rows(run)[0]["gram"] >= 0
    other = tmp_path / "ckpt"
    pretrain("cpu-smoke", other, data=data_dir, overrides=[*QUIET, "train.steps=2", "gram.enabled=true",
                                                            f"gram.teacher={tiny_meta_file}"])  # fmt: skip
    assert "gram" in _rows(other)[-1] and _final_state(other)["gram_teacher"] is None
    with pytest.raises(ConfigError, match="gram.highres must be >= 1"):
        load_config("cpu-smoke", ["gram.highres=0.5"])


def test_gram_student_patches_only_when_needed(data_dir, tmp_path):  # noqa: F811
    cfg = load_config("cpu-smoke")
    nets = build_networks(cfg)
    x = torch.rand(4, 3, 64, 64)
    assert "patches_global" not in nets(x, None, None)
    nets.keep_patches = True
    assert nets(x, None, None)["patches_global"].shape == (4, 16, 192)


@pytest.mark.slow
def test_cpu_smoke_with_gram_and_monitor(data_dir, tmp_path):  # noqa: F811
    """cpu-smoke with Gram anchoring (2x clean Gram crops, EMA teacher): finite, decreasing loss; the dense
    monitor's numbers are in the metrics and a PCA picture per checkpoint is in the run folder."""
    import numpy as np
    from PIL import Image

    labels = tmp_path / "labels"
    labels.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):  # a label map per photo: bright vs dark pixels
        grey = np.asarray(Image.open(data_dir / f"{name}.png").convert("L"))
        Image.fromarray((grey > grey.mean()).astype(np.uint8)).save(labels / f"{name}.png")
    run = tmp_path / "run"
    ov = [*GRAM, "gram.start=5", "gram.ramp_steps=5", "gram.refresh_every=10", "monitor.every=5",
          "monitor.n_probes=8", f"monitor.labels={labels}"]  # fmt: skip
    res = pretrain("cpu-smoke", run, data=data_dir, overrides=ov)
    rows = _rows(run)
    assert len(rows) == 30 and all(math.isfinite(r["loss"]) for r in rows)
    loss = np.array([r["loss"] for r in rows])
    assert loss[-5:].mean() < loss[:5].mean()
    dense = [r for r in rows if "dense_locality" in r]
    assert [r["step"] for r in dense] == [5, 10, 15, 20, 25, 30]
    assert all(0 < r["dense_rank"] <= 1 and r["dense_gram_distance"] >= 0 and 0 <= r["probe_miou"] <= 1
               for r in dense)  # fmt: skip
    assert dense[0]["dense_gram_distance"] < dense[-1]["dense_gram_distance"]  # drift from the start weights
    pics = sorted(p.name for p in (run / "monitor").glob("pca_step*.png"))
    assert pics == ["pca_step00000010.png", "pca_step00000020.png", "pca_step00000030.png"]
    assert "gram" in rows[-1] and res.exported


@pytest.mark.slow
def test_torchrun_fsdp_with_gram_and_monitor(data_dir, tmp_path):  # noqa: F811
    """FSDP2 with an EMA Gram teacher (copied collectively) and the monitor (gathered teacher): no deadlock."""
    from tests.test_ssl_train import _torchrun

    run = tmp_path / "run"
    _torchrun(2, ["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(run), *GRAM, "train.steps=6",
                  "gram.start=2", "monitor.every=3", "train.strategy=fsdp"])  # fmt: skip
    rows = _rows(run)
    assert len(rows) == 6 and "gram" in rows[-1] and "dense_locality" in rows[2]
    assert _final_state(run)["gram_copies"] == 1  # copies due at step indices 2 and 6: 6 is past the end


def test_mixed_global_crop_sizes(data_dir, tmp_path):  # noqa: F811
    """data.global_sizes: one global size per step (the same on every rank), masks and Gram crops follow."""
    from dinoapp.ssl.data import StepBatchSampler, step_variant

    variants = [step_variant(0, s, 2) for s in range(40)]
    assert set(variants[:6]) == {0, 1}  # the 6-step run below uses both sizes
    for rank in (0, 1):
        keys = list(StepBatchSampler(10, 4, 0, total_steps=3, rank=rank, world_size=2, n_variants=2))
        assert [k[0][2] for k in keys] == variants[:3] and all(len({x[2] for x in k}) == 1 for k in keys)
    run = tmp_path / "run"
    res = pretrain("cpu-smoke", run, data=data_dir, overrides=[*QUIET, "train.steps=6", "data.global_sizes=[48, 64]",
                                                                "gram.enabled=true", "gram.teacher=init",
                                                                "gram.highres=2"])  # fmt: skip
    assert res.step == 6 and all(math.isfinite(r["loss"]) and "gram" in r for r in _rows(run))
    assert load_config(run / "config.yaml").data.global_sizes == [48, 64]


def test_monitor_reference_survives_resume(data_dir, tmp_path):  # noqa: F811
    """dense_gram_distance keeps measuring from the run's starting weights after a resume."""
    ov = [*QUIET, "train.steps=6", "monitor.every=2", "monitor.n_probes=4", "run.ckpt_every=2", "monitor.pca=false"]
    pretrain("cpu-smoke", tmp_path / "full", data=data_dir, overrides=ov)
    pretrain("cpu-smoke", tmp_path / "split", data=data_dir, overrides=ov, stop_after=4)
    pretrain(None, tmp_path / "split", resume=True)
    a = [r["dense_gram_distance"] for r in _rows(tmp_path / "full") if "dense_gram_distance" in r]
    b = [r["dense_gram_distance"] for r in _rows(tmp_path / "split") if "dense_gram_distance" in r]
    assert len(a) == 3 and a[-1] > 0 and b == pytest.approx(a, rel=1e-6, abs=1e-9)
