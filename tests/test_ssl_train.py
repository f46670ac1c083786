"""The pretraining loop end to end: cpu-smoke on real sample files, export, exact resume after
SIGKILL, stages, non-finite losses, torchrun (DDP and FSDP2 on gloo) against one process."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoapp.errors import ConfigError
from dinoapp.loading import load_backbone
from dinoapp.ssl import runstate
from dinoapp.ssl.config import load_config
from dinoapp.ssl.train import TrainingDivergedError, build_networks, pretrain

QUIET = ["run.progress=false", "data.bands=rgb"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Satellite GeoTIFFs (4-band Sentinel-2, RGBN aerial, RGB Landsat), a CT slice, photos, one corrupt file."""
    import pydicom.data
    import skimage.data
    from PIL import Image

    from domains import samples

    d = tmp_path_factory.mktemp("ssl_data")
    for name in ("sentinel2", "aerial", "landsat"):
        shutil.copy(samples.path(name), d / Path(samples.path(name)).name)
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), d / "ct_small.dcm")
    for name in ("astronaut", "coffee", "chelsea"):
        img = Image.fromarray(getattr(skimage.data, name)())
        img.thumbnail((200, 200))
        img.save(d / f"{name}.png")
    (d / "broken.tif").write_bytes(b"II*\x00" + os.urandom(200))  # a TIFF header and garbage
    return d


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _final_state(run_dir: Path) -> dict:
    state, _ = runstate.latest_checkpoint(run_dir)
    return state


def _flat(state: dict) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in state["student"].items()}
    out.update({f"teacher.{k}": v for k, v in state["teacher"].items()})
    for pid, s in state["optimizer"]["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{pid}.{k}"] = v
    return out


@pytest.mark.slow
def test_cpu_smoke_end_to_end(data_dir, tmp_path):
    run = tmp_path / "run"
    res = pretrain("cpu-smoke", run, data=data_dir, overrides=QUIET)
    assert res.step == 30 and not res.stopped_early
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    assert {"dino_local", "dino_global", "ibot", "koleo", "lr", "teacher_temp", "img_per_s"} <= set(rows[0])
    loss = np.array([r["loss"] for r in rows])
    assert loss[-5:].mean() < loss[:5].mean(), loss  # it learns something
    assert (run / "metrics.csv").read_text().count("\n") == 31
    # the corrupt file was skipped and recorded, the run went on
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    assert any(e["path"].endswith("broken.tif") for e in errors)
    # the saved config reproduces the run's settings
    cfg = load_config(run / "config.yaml")
    assert cfg.data.path == str(data_dir) and cfg.model.arch_overrides == {"depth": 2}
    # keep-last-k and the export, read back by load_backbone in both layouts
    assert [s for s, _ in runstate.list_checkpoints(run)] == [20, 30]
    state = _final_state(run)
    nets = build_networks(cfg)
    nets.load_state_dict(state["teacher"])
    x = torch.rand(2, 3, 64, 80)
    want = nets.backbone.eval()(x)
    for kind in ("dinoapp", "meta"):
        bb = load_backbone(res.exported[kind])
        assert bb.n_blocks == 2 and bb.embed_dim == 192
        torch.testing.assert_close(bb(x), want, rtol=0, atol=1e-6)
    bb = load_backbone(res.exported["dinoapp"])
    assert set(bb.pretrained_heads) == {"dino_head", "ibot_head"}
    assert bb.provenance["trained_steps"] == 30


def test_refuses_to_overwrite_and_resumes_from_folder(data_dir, tmp_path):
    run = tmp_path / "run"
    res = pretrain("cpu-smoke", run, data=data_dir, overrides=[*QUIET, "train.steps=4", "run.ckpt_every=2"],
                   stop_after=2)  # fmt: skip
    assert res.stopped_early and res.step == 2
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        pretrain("cpu-smoke", run, data=data_dir, overrides=QUIET, resume=False)
    res = pretrain(None, run, resume=True)  # config and data path from the folder
    assert res.step == 4 and not res.stopped_early and "dinoapp" in res.exported
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="no checkpoint"):
        pretrain("cpu-smoke", tmp_path / "empty", data=data_dir, overrides=QUIET, resume=True)


def test_resume_refuses_a_changed_config(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain("cpu-smoke", run, data=data_dir, overrides=[*QUIET, "train.steps=3"], stop_after=1)
    with pytest.raises(ConfigError, match=r"different config: train.batch_size: 8 -> 4"):
        pretrain("cpu-smoke", run, data=data_dir, overrides=[*QUIET, "train.steps=3", "train.batch_size=4"],
                 resume=True)  # fmt: skip
    assert load_config(run / "config.yaml").train.batch_size == 8  # the folder still describes the run
    res = pretrain("cpu-smoke", run, data=data_dir, overrides=[*QUIET, "train.steps=2", "run.log_every=2"],
                   resume=True)  # fmt: skip  # steps and run.* may change
    assert res.step == 2


def test_damaged_newest_checkpoint_falls_back(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain("cpu-smoke", run, data=data_dir, overrides=[*QUIET, "train.steps=4", "run.ckpt_every=1",
                                                         "run.keep_last=3"], stop_after=3)  # fmt: skip
    newest = runstate.list_checkpoints(run)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a full disk
    state, path = runstate.latest_checkpoint(run)
    assert state["step"] == 2 and path.name == "step-00000002.pt"


def test_stage1_trains_heads_only_and_tokens_stay_frozen(data_dir, tmp_path):
    ov = [*QUIET, "train.steps=5", "train.freeze_backbone_steps=3", "train.unfreeze_ramp_steps=2",
          "train.freeze_tokens=true", "run.ckpt_every=1", "run.keep_last=10"]  # fmt: skip
    cfg = load_config("cpu-smoke", ov)
    cfg.data.path = str(data_dir)
    init = build_networks(cfg).state_dict()
    run = tmp_path / "run"
    pretrain(cfg, run)
    states = {s: runstate.load_checkpoint(p) for s, p in runstate.list_checkpoints(run)}
    for step in (1, 2, 3):  # stage 1: backbone untouched, heads moving
        st = states[step]["student"]
        for k, v in init.items():
            if k.startswith("backbone."):
                assert torch.equal(st[k], v), (step, k)
    # (step 1 runs at lr 0: the warm-up starts from 0)
    assert not torch.equal(states[3]["student"]["dino_head.mlp.0.weight"], init["dino_head.mlp.0.weight"])
    # the heads' last layer is frozen for the first optim.freeze_last_layer_steps (2 in cpu-smoke)
    last = "dino_head.last_layer.weight"
    assert torch.equal(states[2]["student"][last], init[last])
    assert not torch.equal(states[5]["student"][last], init[last])
    final = states[5]["student"]
    qkv = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(final[qkv], init[qkv])
    for k in ("backbone.vit.cls_token", "backbone.mask_token"):
        assert torch.equal(final[k], init[k]), k
    assert not torch.equal(final["backbone.vit.reg_token"], init["backbone.vit.reg_token"])


def test_non_finite_losses_are_skipped_then_abort(data_dir, tmp_path, monkeypatch):
    import dinoapp.ssl.train as T

    real = T.ssl_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(T, "ssl_loss", flaky)
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="3 consecutive"):
        pretrain("cpu-smoke", run, data=data_dir, overrides=[*QUIET, "train.nan_patience=3", "run.ckpt_every=1",
                                                                    "run.keep_last=10"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 1, 1, 1]
    # the step with a NaN loss changed nothing: checkpoints 1 and 2 hold the same weights
    s1 = runstate.load_checkpoint(runstate.checkpoint_path(run, 1))["student"]
    s2 = runstate.load_checkpoint(runstate.checkpoint_path(run, 2))["student"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinoapp", "pretrain", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


@pytest.mark.slow
def test_exact_resume_after_sigkill(data_dir, tmp_path):
    """A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""
    ov = [*QUIET, "train.steps=10", "run.ckpt_every=2", "run.keep_last=10", "data.num_workers=2",
          "model.drop_path=0.2"]  # drop path and RoPE rescale draw random numbers every step
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _cli(["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(full), *ov])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out

    p = _cli(["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(killed), *ov])
    deadline = time.time() + 300
    while not runstate.checkpoint_path(killed, 4).exists():
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    done = max(s for s, _ in runstate.list_checkpoints(killed))
    assert 4 <= done < 10, f"killed too late to test anything (checkpoint {done})"
    p = _cli(["--out", str(killed), "--resume"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out

    a, b = _flat(_final_state(full)), _flat(_final_state(killed))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    ma = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in mb] == list(range(1, 11))
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def _torchrun(n: int, args: list[str], timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "dinoapp", "pretrain", *args]  # fmt: skip
    try:
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out (deadlock?): {e.stdout}\n{e.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


# Random per-process draws (drop path, RoPE rescale) differ between 1 and 2 processes by design;
# everything else (crops, masks, SK over all processes, KoLeo neighbours over the global batch) is the same.
MATCH = [*QUIET, "train.batch_size=8", "model.drop_path=0", "model.rope_rescale=null", "run.ckpt_every=100"]
# At random init every CLS token is nearly the same point (LayerScale 1e-5), so KoLeo's gradients are
# huge and Adam's first sign-like steps turn float rounding into visibly different weights: the same
# run with 1 vs 2 threads differs by ~30% of its update. So: with KoLeo, the first two steps (the
# second at a non-zero lr, from the same weights) must give the same loss and gradient norm; without
# KoLeo, four steps must give the same weights.
WITH_KOLEO = [*MATCH, "train.steps=2"]
NO_KOLEO = [*MATCH, "train.steps=4", "loss.koleo_weight=0"]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for name, ov in (("koleo", WITH_KOLEO), ("no_koleo", NO_KOLEO)):
        out = tmp_path_factory.mktemp("one") / name
        p = _cli(["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(out), *ov])
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log
        runs[name] = out
    return runs


def _metrics(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(data_dir, tmp_path, one_process, strategy):
    for name, ov in (("koleo", WITH_KOLEO), ("no_koleo", NO_KOLEO)):
        two = tmp_path / name
        _torchrun(2, ["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(two), *ov,
                      f"train.strategy={strategy}"])  # fmt: skip
        one = one_process[name]
        for key in ("loss", "dino_local", "ibot", "grad_norm") + (("koleo",) if name == "koleo" else ()):
            np.testing.assert_allclose(_metrics(two, key), _metrics(one, key), rtol=2e-5, err_msg=f"{name} {key}")
        a, b = _final_state(one), _final_state(two)
        assert b["world_size"] == 2
        assert (two / "export" / "teacher_backbone.safetensors").exists()
        if name == "no_koleo":
            for k, v in a["student"].items():
                torch.testing.assert_close(b["student"][k], v, rtol=1e-4, atol=1e-5, msg=k)
            for k, v in a["teacher"].items():
                torch.testing.assert_close(b["teacher"][k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_fsdp_run_split_across_jobs_resumes(data_dir, tmp_path, one_process):
    """FSDP2 checkpoints (gathered on all ranks, written by rank 0) load back into sharded models."""
    run = tmp_path / "split"
    args = ["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(run), *NO_KOLEO, "train.strategy=fsdp"]
    _torchrun(2, [*args, "--stop-after", "2"])
    assert [s for s, _ in runstate.list_checkpoints(run)] == [2]
    _torchrun(2, ["--out", str(run), "--resume"])
    a, b = _final_state(one_process["no_koleo"]), _final_state(run)
    assert b["step"] == 4
    for k, v in a["student"].items():
        torch.testing.assert_close(b["student"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    np.testing.assert_allclose(_metrics(run, "loss"), _metrics(one_process["no_koleo"], "loss"), rtol=2e-5)


@pytest.mark.slow
def test_activation_checkpointing_and_bf16_paths(data_dir, tmp_path):
    """Activation checkpointing recomputes the same numbers; bf16 autocast runs (on CPU here)."""
    ov = [*QUIET, "train.steps=2", "run.keep_last=1"]
    plain = pretrain("cpu-smoke", tmp_path / "a", data=data_dir, overrides=ov)
    ckpt = pretrain("cpu-smoke", tmp_path / "b", data=data_dir, overrides=[*ov, "train.grad_checkpointing=true"])
    assert _metrics(plain.run_dir, "loss") == _metrics(ckpt.run_dir, "loss")
    sa, sb = _final_state(plain.run_dir)["student"], _final_state(ckpt.run_dir)["student"]
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    bf = pretrain("cpu-smoke", tmp_path / "c", data=data_dir, overrides=[*ov, "train.precision=bf16"])
    assert all(math.isfinite(v) for v in _metrics(bf.run_dir, "loss"))


def test_cli_presets_and_print_config(capsys):
    from dinoapp.cli import main

    assert main(["pretrain", "--list-presets"]) == 0
    assert "vits16-continue-1gpu" in capsys.readouterr().out.split()
    assert main(["pretrain", "--config", "cpu-smoke", "--print-config", "optim.lr=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "backbone: vit_tiny" in printed
    assert main(["pretrain", "--config", "cpu-smoke", "--print-config", "optim.lrr=0.5"]) == 2
    assert "unknown key optim.lrr" in capsys.readouterr().err


def test_collapse_warnings():
    from dinoapp.ssl.train import CollapseWarning, _collapse_warnings

    warned = {}
    with pytest.warns(CollapseWarning, match="nearly uniform"):
        _collapse_warnings({"target_entropy": 0.999, "cls_spread": 0.8}, warned, 100)
    with pytest.warns(CollapseWarning, match="collapse to one point"):
        _collapse_warnings({"target_entropy": 0.5, "cls_spread": 0.001}, warned, 120)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _collapse_warnings({"target_entropy": 0.999, "cls_spread": 0.001}, warned, 150)  # rate-limited
        _collapse_warnings({"target_entropy": 0.5, "cls_spread": 0.9}, {}, 400)  # healthy


@pytest.mark.slow
def test_torchrun_ddp_without_ibot_and_with_stages(data_dir, tmp_path):
    """DDP with the iBOT term off (its head gets no gradients) and a frozen-backbone stage change."""
    run = tmp_path / "run"
    _torchrun(2, ["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(run), *QUIET, "train.steps=3",
                  "loss.ibot_weight=0", "train.freeze_backbone_steps=1", "train.unfreeze_ramp_steps=1"])  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "ibot" not in rows[0] and all(r["skipped"] == 0 for r in rows)


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(data_dir, tmp_path):
    """Preemption (SIGTERM): the step in flight finishes, a checkpoint is written, the process exits 0."""
    run = tmp_path / "run"
    p = _cli(["--config", "cpu-smoke", "--data", str(data_dir), "--out", str(run), *QUIET, "train.steps=200",
              "run.ckpt_every=2"])  # fmt: skip
    deadline = time.time() + 300
    while not runstate.checkpoint_path(run, 2).exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "stopped at step" in out and "--resume" in out
    stopped = int(out.split("stopped at step ")[1].split(";")[0])
    assert 2 <= stopped < 200 and runstate.list_checkpoints(run)[-1][0] == stopped


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["train.compile=true", "train.grad_checkpointing=true"]])
def test_cuda_bf16_run(data_dir, tmp_path, extra):
    """The CUDA path: bf16 autocast, fused AdamW, optionally compiled blocks + activation checkpointing."""
    ov = [*QUIET, "train.steps=4", "train.device=cuda", "train.precision=auto", *extra]
    res = pretrain("cpu-smoke", tmp_path / "run", data=data_dir, overrides=ov)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    bb = load_backbone(res.exported["dinoapp"])
    assert torch.isfinite(bb(torch.rand(1, 3, 64, 64))).all()


def test_continued_pretraining_starts_from_the_file(data_dir, tmp_path, tiny_meta_file, tiny_sd):
    """Student and teacher start from a checkpoint file's weights (mask token included) with fresh
    heads; in stage 1 only the heads move; in stage 2 CLS/mask tokens stay frozen; 4 input bands."""
    ov = [*QUIET, f"model.backbone={tiny_meta_file}", "model.arch_overrides={}", "train.steps=4",
          "train.freeze_backbone_steps=2", "train.unfreeze_ramp_steps=1", "train.freeze_tokens=true",
          "run.ckpt_every=1", "run.keep_last=5", "model.drop_path=0.1"]  # fmt: skip
    run = tmp_path / "run"
    res = pretrain("cpu-smoke", run, data=data_dir, overrides=ov)
    states = {s: runstate.load_checkpoint(p) for s, p in runstate.list_checkpoints(run)}
    for who in ("student", "teacher"):
        st = states[3][who]  # steps 0-1 frozen, step 2 starts the ramp at 0
        torch.testing.assert_close(st["backbone.mask_token"], tiny_sd["mask_token"].reshape(1, -1))
        torch.testing.assert_close(st["backbone.vit.blocks.1.attn.qkv.weight"], tiny_sd["blocks.1.attn.qkv.weight"])
    final = states[4]["student"]
    assert not torch.equal(final["backbone.vit.blocks.1.attn.qkv.weight"], tiny_sd["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(final["backbone.mask_token"], tiny_sd["mask_token"].reshape(1, -1))
    torch.testing.assert_close(final["backbone.vit.cls_token"], tiny_sd["cls_token"])
    assert load_backbone(res.exported["dinoapp"]).n_blocks == 4
    # extra input bands for multispectral data: the 4-band Sentinel-2 / aerial files train as they are
    res4 = pretrain("cpu-smoke", tmp_path / "four", data=data_dir,
                    overrides=[*QUIET[:1], "model.in_chans=4", "data.bands=[1,2,3,4]", "train.steps=2",
                               f"model.backbone={tiny_meta_file}", "model.arch_overrides={}"])  # fmt: skip
    bb4 = load_backbone(res4.exported["dinoapp"])
    assert bb4.in_chans == 4 and len(bb4.mean) == 4
    errors = (tmp_path / "four" / "errors.jsonl").read_text()
    assert "landsat" in errors and "astronaut" in errors  # 3-band files cannot feed a 4-band model: skipped
