"""Distillation engine: frozen teacher outside the graph, one teacher pass for all students, students
move towards the teacher on held-out images (ViT and ConvNeXt), exact resume, export, CLI."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dinoapp import load_backbone
from dinoapp.checkpoint import save_backbone
from dinoapp.distill import train as T
from dinoapp.distill.config import load_distill_config
from dinoapp.distill.model import StudentNet, agreement, head_losses
from dinoapp.errors import ConfigError
from dinoapp.ssl import dist as D
from dinoapp.ssl import runstate
from dinoapp.ssl.heads import DINOHead
from dinoapp.ssl.losses import sinkhorn_knopp

VIT_S = {"name": "vit", "backbone": "vit_tiny", "arch_overrides": {"embed_dim": 96, "depth": 2, "num_heads": 3}}
CNN_S = {"name": "cnn", "backbone": "timm:convnext_atto", "arch_overrides": {"out_index": 2}}


def make_teacher(path: Path, *, heads: bool, seed: int = 0) -> Path:
    """A tiny teacher whose features depend on the image: a random ViT with unit LayerScale (a random
    init's 1e-5 LayerScale maps every image to nearly the same tokens), with peaked random heads."""
    bb = load_backbone("vit_tiny", depth=3, seed=seed)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "gamma" in n:
                p.fill_(1.0)
    if heads:
        g = torch.Generator().manual_seed(seed)
        for name in ("dino_head", "ibot_head"):
            h = DINOHead(192, 256, hidden_dim=128, bottleneck_dim=32)
            with torch.no_grad():
                h.last_layer.weight.copy_(torch.randn(h.last_layer.weight.shape, generator=g))
                for m in h.mlp:
                    if isinstance(m, nn.Linear):
                        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
            bb.pretrained_heads[name] = h.state_dict()
    return save_backbone(bb, path)


def _photos(d: Path, names: tuple[str, ...]) -> Path:
    import skimage.data
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((160, 160))
        img.save(d / f"{name}.png")
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    train = _photos(root / "train", ("astronaut", "coffee", "chelsea", "camera", "rocket", "hubble_deep_field",
                                     "immunohistochemistry", "retina"))  # fmt: skip
    (train / "broken.tif").write_bytes(b"II*\x00" + os.urandom(200))  # recorded and skipped
    held = _photos(root / "held", ("brick", "grass", "gravel", "moon", "page", "text", "clock", "horse"))
    return {"train": train, "held": held, "teacher": make_teacher(root / "t.safetensors", heads=False),
            "teacher_heads": make_teacher(root / "th.safetensors", heads=True)}  # fmt: skip


def _cfg(files, students, *extra, heads=False, steps=30):
    students = "[" + ", ".join(_yaml(s) for s in students) + "]"
    return load_distill_config("distill-cpu-smoke", [
        f"teacher.backbone={files['teacher_heads' if heads else 'teacher']}", f"data.path={files['train']}",
        f"students={students}", f"train.steps={steps}", "run.progress=false", *extra])  # fmt: skip


def _yaml(d) -> str:
    import json

    return json.dumps(d)


def _engine(cfg):
    info = D.init("cpu")
    eng = T.build_engine(cfg, info)
    ds = T.build_dataset(cfg, eng, Path(cfg.data.path).parent / "run_scratch", 0)
    from dinoapp.ssl.data import StepBatchSampler, make_loader

    sampler = StepBatchSampler(len(ds), cfg.train.batch_size, cfg.train.seed, total_steps=cfg.train.steps)
    return eng, ds, iter(make_loader(ds, sampler, num_workers=0))


def _held(files, eng, size: int = 64) -> torch.Tensor:
    from dinoapp.ssl.monitor import probe_batch
    from domains.datasets import FolderDataset

    tb = eng.teacher.backbone
    return probe_batch(FolderDataset(files["held"]), 8, size, tb.mean, tb.std)


# --- teacher: frozen, outside autograd, activations released -----------------------------------------
@pytest.mark.parametrize("mode", ["features", "heads"])
def test_teacher_frozen_outside_graph_and_released(files, mode):
    cfg = _cfg(files, [VIT_S, {**VIT_S, "name": "vit2", "arch_overrides": {"depth": 1}}], f"loss.mode={mode}",
               heads=True, steps=3)  # fmt: skip
    eng, _, it = _engine(cfg)
    tb = eng.teacher.backbone
    before = {k: v.clone() for k, v in tb.state_dict().items()}
    heads_before = {k: v.clone() for k, v in eng.teacher.dino_head.state_dict().items()} if mode == "heads" else {}
    refs: list[weakref.ref] = []
    orig = tb.forward_features

    def spy(x, masks=None):
        out = orig(x, masks)
        for v in out.values():
            if isinstance(v, torch.Tensor):
                assert not v.requires_grad and v.grad_fn is None  # never in the autograd graph
                refs.append(weakref.ref(v))
        return out

    tb.forward_features = spy
    for step in range(3):
        r = eng.step(step, next(it))
        assert all(res["ok"] for res in r.values())
        gc.collect()
        assert refs and all(ref() is None for ref in refs), "teacher activations outlive the step"
        refs.clear()
    for k, v in tb.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in heads_before.items():
        assert torch.equal(eng.teacher.dino_head.state_dict()[k], v)
    assert all(not p.requires_grad and p.grad is None for p in tb.parameters())
    assert not isinstance(tb, nn.parallel.DistributedDataParallel) and not tb.training
    # and the students did learn
    for st in eng.students:
        assert any(p.grad is None for p in st.net.parameters())  # zeroed after the step
        assert st.optimizer.state


@pytest.mark.parametrize("n_local", [0, 2])
def test_one_teacher_pass_shared_by_all_students(files, n_local):
    counts = {}
    for students in ([VIT_S], [VIT_S, {**VIT_S, "name": "vit2", "arch_overrides": {"depth": 1}}]):
        cfg = _cfg(files, students, "loss.mode=features", f"data.n_local={n_local}", steps=3)
        eng, _, it = _engine(cfg)
        calls: list[int] = []
        orig = eng.teacher.backbone.forward_features
        eng.teacher.backbone.forward_features = lambda x, m=None, o=orig, c=calls: c.append(x.shape[0]) or o(x, m)
        for step in range(3):
            r = eng.step(step, next(it))
            assert set(r) == {s["name"] for s in students}
        counts[len(students)] = list(calls)
        assert eng.teacher_forwards == 3
    # one global pass per step (plus one local pass when the feature terms use local crops), whatever the student count
    assert counts[1] == counts[2] == [16] * 3 if n_local == 0 else counts[1] == counts[2] == [16, 16] * 3


# --- losses against naive references -----------------------------------------------------------------
def test_head_losses_match_naive_loops():
    torch.manual_seed(0)
    G, L, B, K, N = 2, 3, 4, 10, 6
    out = {
        "dino_global": torch.randn(G * B, K),
        "dino_local": torch.randn(L * B, K),
        "cls_global": torch.randn(G * B, 8),
    }
    t = sinkhorn_knopp(torch.randn(G * B, K), 0.07, 3).reshape(G, B, K)
    pos = torch.rand(G * B, N) < 0.4
    pos[0] = False  # an image without positions counts 0
    m = int(pos.sum())
    out["ibot"] = torch.randn(m, K)
    it = torch.softmax(torch.randn(m, K), -1)
    for same in (True, False):
        got = head_losses(out, t, it, pos, student_temp=0.1, dino_weight=1.0, ibot_weight=0.5, koleo_weight=0.0,
                          same_crop=same, koleo_gather=False)  # fmt: skip
        terms = []
        sg, sl = out["dino_global"].reshape(G, B, K), out["dino_local"].reshape(L, B, K)
        for crops in (sg, sl):
            for s in range(crops.shape[0]):
                for ti in range(G):
                    if crops is sg and s == ti and not same:
                        continue
                    for b in range(B):
                        terms.append(-(t[ti, b] * torch.log_softmax(crops[s, b] / 0.1, -1)).sum())
        dino = torch.stack(terms).mean()  # every (student crop, teacher crop, image) pair weighs the same
        per_image, row = [], 0
        for b in range(G * B):
            k = int(pos[b].sum())
            ce = [-(it[row + j] * torch.log_softmax(out["ibot"][row + j] / 0.1, -1)).sum() for j in range(k)]
            per_image.append(torch.stack(ce).mean() if k else torch.tensor(0.0))
            row += k
        ibot = torch.stack(per_image).mean()
        torch.testing.assert_close(got["loss"], dino + 0.5 * ibot, rtol=1e-5, atol=1e-5)


# --- learning: the students move towards the teacher on held-out images --------------------------------
@pytest.mark.slow
def test_feature_distillation_moves_vit_and_convnext_students_closer(files, one_thread):
    cfg = _cfg(files, [VIT_S, CNN_S], "loss.mode=features", steps=40)
    eng, _, it = _engine(cfg)
    held = _held(files, eng)
    before = {st.name: agreement(eng.teacher, st.net, held, 64) for st in eng.students}
    for step in range(cfg.train.steps):
        eng.step(step, next(it))
    after = {st.name: agreement(eng.teacher, st.ema, held, 64) for st in eng.students}
    for name in ("vit", "cnn"):
        b, a = before[name], after[name]
        # cosine similarity with the teacher (through the projector) on images never trained on
        assert a["cls_cos"] > b["cls_cos"] + 0.3, (name, b, a)
        assert a["patch_cos"] > b["patch_cos"] + 0.2, (name, b, a)
        assert a["gram_dist"] < b["gram_dist"], (name, b, a)  # the dense structure moves towards the teacher's


@pytest.mark.slow
def test_head_recipe_learns_teacher_targets(files, one_thread):
    cfg = _cfg(files, [VIT_S], "loss.mode=heads", "optim.lr=3e-3", heads=True, steps=40)
    eng, _, it = _engine(cfg)
    assert eng.use_heads and not eng.use_features
    st = eng.students[0]
    assert st.net.cls_proj is None and st.net.dino_head.n_prototypes == 256
    losses = [float(eng.step(s, next(it))["vit"]["losses"]["dino_global"]) for s in range(cfg.train.steps)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_heads_mode_without_teacher_heads_is_a_clear_error(files):
    cfg = _cfg(files, [VIT_S], "loss.mode=heads", steps=2)
    with pytest.raises(ConfigError, match="heads"):
        T.build_engine(cfg, D.init("cpu"))
    cfg = _cfg(files, [VIT_S], "loss.mode=auto", steps=2)  # auto picks the feature recipe for a head-less teacher
    eng = T.build_engine(cfg, D.init("cpu"))
    assert eng.use_features and not eng.use_heads


def test_student_patch_grid_must_fit(files):
    cfg = _cfg(files, [{**CNN_S, "arch_overrides": {"out_index": -1}}], "data.global_size=48", steps=2)
    with pytest.raises(ConfigError, match="multiple of student 'cnn'"):
        T.build_engine(cfg, D.init("cpu"))


def test_teacher_resolution_scale(files):
    cfg = _cfg(files, [VIT_S], "teacher.resolution=2", "data.n_local=1", steps=2)
    eng, ds, it = _engine(cfg)
    batch = next(it)
    assert batch["global_crops"].shape[-1] == 128 and batch["local_crops"].shape[-1] == 64  # the teacher's sizes
    shapes = []
    orig = eng.teacher.backbone.forward_features
    eng.teacher.backbone.forward_features = lambda x, masks=None: shapes.append(tuple(x.shape[-2:])) or orig(x)
    r = eng.step(0, batch)
    assert shapes == [(128, 128), (64, 64)] and r["vit"]["ok"]


# --- the run: resume exactness, export, evaluation ------------------------------------------------------
def _flat_state(run: Path) -> dict[str, torch.Tensor]:
    state, _ = runstate.latest_checkpoint(run)
    out = {}
    for name, s in state["students"].items():
        for part in ("net", "ema"):
            out.update({f"{name}.{part}.{k}": v for k, v in s[part].items()})
        for pid, st in s["optimizer"]["state"].items():
            out.update({f"{name}.opt.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.slow
def test_resume_is_exact_and_exports_load(files, tmp_path, one_thread):
    extra = ["loss.mode=both", "run.ckpt_every=3"]
    students = [{**VIT_S, "drop_path": 0.2}, CNN_S]
    full = T.distill(_cfg(files, students, *extra, heads=True, steps=6), tmp_path / "full")
    assert not full.stopped_early and set(full.exported) == {"vit", "cnn"}
    part = T.distill(_cfg(files, students, *extra, heads=True, steps=6), tmp_path / "split", stop_after=4)
    assert part.stopped_early and part.step == 4 and not part.exported
    resumed = T.distill(None, tmp_path / "split", resume=True)
    assert resumed.step == 6
    a, b = _flat_state(tmp_path / "full"), _flat_state(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # exported EMA students read back with load_backbone and give the EMA's outputs; heads/projectors travel along
    state, _ = runstate.latest_checkpoint(tmp_path / "full")
    x = torch.randn(2, 3, 64, 64)
    for name, path in full.exported.items():
        bb = load_backbone(path)
        assert bb.provenance["distilled_from"] == str(files["teacher_heads"])
        assert {"dino_head", "cls_proj"} <= set(bb.pretrained_heads)
        ema_bb = {k.removeprefix("backbone."): v for k, v in state["students"][name]["ema"].items()
                  if k.startswith("backbone.")}  # fmt: skip
        ref = T.build_student(_cfg(files, students, *extra, heads=True), [s["name"] for s in students].index(name),
                              T.build_teacher(_cfg(files, students, heads=True), torch.device("cpu")), True, True,
                              torch.device("cpu")).backbone.eval()  # fmt: skip
        ref.load_state_dict(ema_bb)
        torch.testing.assert_close(bb.forward_features(x)["x_norm_patchtokens"],
                                   ref.forward_features(x)["x_norm_patchtokens"])  # fmt: skip
    assert (tmp_path / "full" / "students" / "vit" / "backbone_meta.pth").is_file()
    assert not (tmp_path / "full" / "students" / "cnn" / "backbone_meta.pth").exists()  # Meta's layout is ViT-only
    ev = full.evaluation
    assert set(ev["agreement"]) == {"vit", "cnn"} and "cls_cos" in ev["agreement"]["vit"]
    assert set(ev["probe"]["rows"]) == {"teacher", "vit", "cnn"}
    assert (tmp_path / "full" / "eval.json").is_file()
    assert "broken.tif" in (tmp_path / "full" / "errors.jsonl").read_text()


def test_resume_refuses_changed_settings(files, tmp_path):
    teacher = make_teacher(tmp_path / "teacher.safetensors", heads=False)

    def cfg(students=(VIT_S,)):
        return _cfg({**files, "teacher": teacher}, list(students), steps=4)

    T.distill(cfg(), tmp_path / "r", stop_after=2)
    with pytest.raises(ConfigError, match="students"):
        T.distill(cfg([{**VIT_S, "drop_path": 0.1}]), tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        T.distill(cfg(), tmp_path / "r", resume=False)
    original = teacher.read_bytes()
    make_teacher(teacher, heads=False, seed=1)  # the teacher file changed under the run
    with pytest.raises(ConfigError, match="teacher file changed"):
        T.distill(cfg(), tmp_path / "r", resume=True)
    teacher.write_bytes(original)  # the same file again: continues
    done = T.distill(cfg(), tmp_path / "r", resume=True)
    assert done.step == 4 and not done.stopped_early


# --- CLI -----------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dinoapp", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_cli_presets_and_print_config():
    r = _cli(["distill", "--list-presets"])
    assert r.returncode == 0 and r.stdout.split() == ["distill-cpu-smoke", "distill-l-to-s"]
    r = _cli(
        ["distill", "--config", "distill-cpu-smoke", "--print-config", "--teacher", "T.pth", "students.1.drop_path=0.1"]
    )
    assert r.returncode == 0, r.stderr
    import yaml

    cfg = yaml.safe_load(r.stdout)
    assert cfg["teacher"]["backbone"] == "T.pth" and cfg["students"][1]["drop_path"] == 0.1
    r = _cli(["distill", "--config", "distill-cpu-smoke", "--print-config", "students.5.drop_path=0.1"])
    assert r.returncode == 2 and "students.<index>" in r.stderr


@pytest.mark.slow
def test_cli_smoke_run_with_probe_evaluation(files, tmp_path):
    """The preset as shipped (two students: a ViT and a ConvNeXt), evaluated on a labelled probe."""
    import csv

    probe = tmp_path / "labels.csv"
    with open(probe, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p in sorted(files["held"].iterdir()):
            w.writerow([str(p), "text" if p.stem in ("page", "text") else "other"])
    out = tmp_path / "run"
    r = _cli(["distill", "--config", "distill-cpu-smoke", "--data", str(files["train"]), "--out", str(out),
              "--teacher", str(files["teacher"]), "train.steps=12", f"eval.labels_csv={probe}",
              "eval.k=3"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exported student vit" in r.stdout and "exported student cnn" in r.stdout
    assert "knn_acc" in r.stdout or "kNN" in r.stdout
    for name in ("vit", "cnn"):
        assert (out / "students" / name / "backbone.safetensors").is_file()
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 12 and "cnn/loss" in rows[-1] and "vit/gram" in rows[-1]
    r = _cli(["distill-eval", "--teacher", str(files["teacher"]), "--student",
              f"vit={out / 'students' / 'vit' / 'backbone.safetensors'}", "--size", "64"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "teacher" in r.stdout and "vit" in r.stdout


def test_student_net_modules_follow_the_recipe():
    bb = load_backbone("vit_tiny", depth=1, seed=0)
    net = StudentNet(bb, teacher_dim=384, cls_features=True, patch_features=False, projector="auto")
    assert net.cls_proj is not None and net.patch_proj is None and net.dino_head is None
    out = net(torch.randn(4, 3, 32, 32), None, None)
    assert out["cls_proj"].shape == (4, 384) and "patch_proj" not in out


@pytest.mark.slow
@pytest.mark.parametrize("terms", [["loss.mode=both"], ["loss.mode=features", "loss.cls_weight=0"]])
def test_torchrun_two_processes_match_one(files, tmp_path, terms):
    """Both students trained as DDP over 2 processes (gloo) == 1 process: the same crops, patch
    positions, Sinkhorn-Knopp over all processes, one teacher replica per process. A term switched
    off leaves no module without gradients behind (DDP would stop)."""
    args = ["--config", "distill-cpu-smoke", "--data", str(files["train"]), "--teacher", str(files["teacher_heads"]),
            *terms, "loss.koleo_weight=0", "train.steps=4", "run.progress=false", "run.ckpt_every=100",
            "eval.n_probes=2"]  # fmt: skip
    one = _cli(["distill", *args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dinoapp",
           "distill", *args, "--out", str(tmp_path / "two")]  # fmt: skip
    try:
        two = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out (deadlock?): {e.stdout}\n{e.stderr}")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    a, b = _flat_state(tmp_path / "one"), _flat_state(tmp_path / "two")
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        if ".opt." in k and k.endswith(".step"):
            continue
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    state, _ = runstate.latest_checkpoint(tmp_path / "one")
    for name in ("vit", "cnn"):  # and training did change the students
        cfg = load_distill_config("distill-cpu-smoke", [f"teacher.backbone={files['teacher_heads']}", *terms])
        teacher = T.build_teacher(cfg, torch.device("cpu"))
        heads, feats = T.resolve_mode(cfg.loss.mode, True)
        init = T.build_student(cfg, ["vit", "cnn"].index(name), teacher, heads, feats, torch.device("cpu"))
        saved = state["students"][name]["net"]
        assert saved.keys() == init.state_dict().keys()
        moved += sum(not torch.equal(v, saved[k]) for k, v in init.state_dict().items())
    assert moved > 20


@pytest.mark.slow
def test_sigkill_and_resume_from_the_cli_is_exact(files, tmp_path):
    """A CLI run killed with SIGKILL (2 data workers) and resumed ends bit-identical to an uninterrupted one."""
    import signal
    import time

    args = ["distill", "--config", "distill-cpu-smoke", "--data", str(files["train"]), "--teacher",
            str(files["teacher"]), "train.steps=8", "run.ckpt_every=2", "run.keep_last=10", "data.num_workers=2",
            "students.0.drop_path=0.2", "run.progress=false", "eval.n_probes=2"]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _cli([*args, "--out", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen([sys.executable, "-m", "dinoapp", *args, "--out", str(killed)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not runstate.checkpoint_path(killed, 4).exists():
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    r = _cli(["distill", "--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _flat_state(full), _flat_state(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 8  # rows after the resumed checkpoint were dropped, then written again


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["train.compile=true", "train.grad_checkpointing=true"]])
def test_cuda_bf16_distillation(files, tmp_path, extra):
    """The CUDA path: teacher and students under bf16 autocast, fused AdamW, optionally compiled ViT blocks
    + activation checkpointing; both recipes, a ViT and a ConvNeXt student."""
    cfg = _cfg(files, [VIT_S, CNN_S], "loss.mode=both", "train.device=cuda", "train.precision=auto", *extra,
               heads=True, steps=4)  # fmt: skip
    res = T.distill(cfg, tmp_path / "run")
    import json

    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r[f"{n}/skipped"] == 0 and r[f"{n}/loss"] == r[f"{n}/loss"] for r in rows for n in ("vit", "cnn"))
    assert set(res.exported) == {"vit", "cnn"}


def test_batchnorm_student_ema_keeps_running_statistics(files, tmp_path):
    """A ResNet student: the exported EMA model carries the trained BatchNorm statistics, not the
    initial zeros/ones (an EMA over parameters alone would leave them there)."""
    res = {"name": "resnet", "backbone": "timm:resnet10t", "arch_overrides": {"out_index": 3}}
    out = T.distill(_cfg(files, [res], "loss.mode=features", "eval.n_probes=2", steps=3), tmp_path / "bn")
    state, _ = runstate.latest_checkpoint(tmp_path / "bn")
    net, ema = state["students"]["resnet"]["net"], state["students"]["resnet"]["ema"]
    stats = [k for k in net if k.endswith("running_var")]
    assert stats and all(torch.equal(net[k], ema[k]) for k in stats)
    assert not torch.allclose(ema[stats[0]], torch.ones_like(ema[stats[0]]))
    bb = load_backbone(out.exported["resnet"])
    loaded = dict(bb.state_dict())
    assert torch.equal(loaded[stats[0].removeprefix("backbone.")], ema[stats[0]])


def test_shared_head_teacher_gives_ibot_targets_from_its_dino_head(files, tmp_path):
    bb = load_backbone(files["teacher_heads"])
    bb.pretrained_heads.pop("ibot_head")  # a DINOv2-style teacher: one head for both terms
    single = save_backbone(bb, tmp_path / "single.safetensors")
    cfg = _cfg({**files, "teacher_heads": single}, [VIT_S], "loss.mode=heads", heads=True, steps=2)
    eng, _, it = _engine(cfg)
    assert eng.teacher.ibot_head is None and eng.students[0].net.ibot_head is not None
    r = eng.step(0, next(it))["vit"]
    assert r["ok"] and "ibot" in r["losses"]


def test_a_pretraining_folder_is_not_resumed_as_distillation(files, tmp_path):
    from dinoapp.ssl.train import pretrain

    pretrain("cpu-smoke", tmp_path / "pre", data=files["train"], overrides=["train.steps=2", "run.progress=false"])
    with pytest.raises(ConfigError, match="holds a pretrain run"):
        T.distill(_cfg(files, [VIT_S], steps=4), tmp_path / "pre", resume=True)
