"""Trainer: a short run on the embedded digits whose loss decreases, exact resume after a crash,
atomic checkpoints (latest always complete, old ones pruned), the lr schedule.

Run: .venv/bin/python -m pytest -q tests/test_trainer.py
"""
from pathlib import Path

import pytest
import torch

from d2v.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from d2v.config import load_config
from d2v.metrics import read_metrics
from d2v.optim import lr_at
from d2v.trainer import Trainer
from tests.utils import Crash, micro_overrides

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny_image.yaml"


def micro(out_dir, steps=6, **extra):
    return load_config(TINY, micro_overrides(out_dir, steps, **extra))


@pytest.mark.slow
def test_short_run_loss_decreases(tmp_path):
    cfg = micro(tmp_path, steps=60, **{"optim.warmup_steps": 6, "train.ckpt_every": 100,
                                       "ema.ema_start": 0.99, "ema.ema_end": 0.999})
    summary = Trainer(cfg, progress=False).train()
    rows = read_metrics(summary["metrics_csv"])
    assert [r["step"] for r in rows] == list(range(1, 61))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.88 * first, (first, last)  # measured ~0.82 (7.34 -> 6.04); flat loss = no learning
    assert Path(summary["loss_curve"]).stat().st_size > 10_000  # a real PNG was drawn
    assert summary["unreadable_files"] == []


def test_resume_continues_exactly(tmp_path, monkeypatch):
    steps = 6
    full = Trainer(micro(tmp_path / "a", steps), progress=False)
    full.train()
    ref = read_metrics(tmp_path / "a" / "metrics.csv")

    cfg_b = micro(tmp_path / "b", steps)
    crashing = Trainer(cfg_b, progress=False)
    orig = crashing.teacher.update

    def update_then_crash(step):
        d = orig(step)
        if step == 4:  # after the step-3 checkpoint, mid-way to the next one
            raise Crash("simulated crash")
        return d

    monkeypatch.setattr(crashing.teacher, "update", update_then_crash)
    with pytest.raises(Crash):
        crashing.train()
    assert resolve_checkpoint(tmp_path / "b").name == "step_00000003"

    resumed = Trainer(cfg_b, resume=True, progress=False)
    assert resumed.step == 3
    resumed.train()
    got = read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for a, b in zip(ref, got):
        for k in ("loss", "loss_reg", "loss_cls", "target_var", "pred_var", "lr", "ema_decay"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    for (n, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n
    for p, q in zip(full.teacher.module.parameters(), resumed.teacher.module.parameters()):
        assert torch.equal(p, q)


def test_checkpoints_atomic_latest_and_pruned(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(out, step, {"step": step, "x": torch.tensor([step])}, {"a": step}, keep_last=2)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    # a crash mid-write leaves a temp folder; it is never taken for a checkpoint
    (root / ".step_00000004.tmp-999").mkdir()
    (root / ".step_00000004.tmp-999" / "state.pt").write_bytes(b"partial")
    state, cfg, ck = load_checkpoint(out)
    assert ck.name == "step_00000003" and state["step"] == 3 and cfg == {"a": 3}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")
    (ck / "state.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        load_checkpoint(out)


def test_lr_schedule_warmup_then_cosine(tmp_path):
    cfg = micro(tmp_path, steps=110, **{"optim.warmup_steps": 10, "optim.lr": 1.0})
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_biases_and_norms():
    from d2v.config import Config
    from d2v.model import build_model
    from d2v.optim import param_groups

    m = build_model(Config.from_dict({"model": {"flavor": "tiny"}, "objective": {"average_top_k_layers": 4}}))
    decay, no_decay = param_groups(m, 0.05, decay_1d=False)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.norm1.weight" in nd and "blocks.0.attn.qkv.bias" in nd
    assert "modality_encoder.extra_tokens" not in nd  # (1, 1, D): decayed, as in the reference
    assert all(names[id(p)].endswith(("weight", "extra_tokens")) for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_bf16_autocast_run_is_finite(tmp_path):
    s = Trainer(micro(tmp_path, steps=2, **{"train.precision": "bf16"}), progress=False).train()
    assert all(v == v and abs(v) < 1e6 for k, v in s["final"].items() if isinstance(v, float))


def test_collapse_guard_stops_the_run(tmp_path):
    from d2v.trainer import CollapseError

    cfg = micro(tmp_path, steps=3, **{"objective.min_target_var": 5.0, "objective.collapse_check_after": 1})
    with pytest.raises(CollapseError, match="target_var .* < objective.min_target_var 5.0 at step 1"):
        Trainer(cfg, progress=False).train()


def test_existing_run_is_never_overwritten_and_resume_checks_config(tmp_path):
    Trainer(micro(tmp_path, steps=3), progress=False).train()
    with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
        Trainer(micro(tmp_path, steps=3), progress=False)
    done = Trainer(micro(tmp_path, steps=3), resume=True, progress=False)  # finished run: nothing to do
    summary = done.train()
    assert done.step == 3 and summary["steps_this_run"] == 0
    assert summary["final"]["step"] == 3 and summary["final"]["loss"] > 0  # last logged metrics
    assert summary["skipped_steps"] == 0
    longer = Trainer(micro(tmp_path, steps=5, **{"ema.anneal_end_step": 3,
                                                  "train.allow_schedule_change": True}),
                     resume=True, progress=False)  # max_steps may change
    assert longer.step == 3
    with pytest.raises(ValueError, match="config differs in optim.lr"):
        Trainer(micro(tmp_path, steps=3, **{"optim.lr": 0.5}), resume=True, progress=False)
    fresh = Trainer(micro(tmp_path / "new", steps=3), resume=True, progress=False)  # nothing to resume
    assert fresh.step == 0 and fresh.resumed_from is None


def test_replacing_the_step_latest_names_keeps_a_resumable_run(tmp_path, monkeypatch):
    """Re-saving step 2 while `latest` names it (a run rolled back with --resume .../step_X): the old
    folder is renamed aside, not deleted, until `latest` moved; killed in between, resolving falls back
    to the newest complete checkpoint with a warning. Done normally, no old folder is left."""
    import os

    from d2v import checkpoint

    out = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(out, step, {"step": step}, {"a": step}, keep_last=5)
    root = out / "checkpoints"
    real_replace = os.replace

    def killed(src, dst):
        if Path(src).name.startswith(".step_00000002.tmp"):
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, 2, {"step": 2, "again": True}, {"a": 2}, keep_last=5)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert (root / "latest").read_text().strip() == "step_00000002" and not (root / "step_00000002").exists()
    aside = list(root.glob(".step_00000002.old-*"))
    assert len(aside) == 1 and (aside[0] / "state.pt").is_file()  # the old step 2 still exists
    with pytest.warns(UserWarning, match="latest names step_00000002, which has no state.pt: using the "
                                         "newest complete checkpoint, .*step_00000001"):
        assert resolve_checkpoint(out).name == "step_00000001"

    save_checkpoint(out, 2, {"step": 2, "again": True}, {"a": 2}, keep_last=5)
    save_checkpoint(out, 2, {"step": 2, "third": True}, {"a": 2}, keep_last=5)  # replaces the named step
    state, _, ck = load_checkpoint(out)
    assert ck.name == "step_00000002" and state.get("third") is True
    assert not list(root.glob(".step_*"))  # no folder set aside is left once `latest` moved
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000002"]


def test_resume_falls_back_to_a_complete_checkpoint_or_refuses(tmp_path):
    cfg = micro(tmp_path, steps=6)  # checkpoints at 3 and 6
    Trainer(cfg, progress=False).train()
    root = tmp_path / "checkpoints"
    (root / "step_00000006" / "state.pt").unlink()  # `latest` names a damaged folder
    with pytest.warns(UserWarning, match="using the newest complete checkpoint"):
        resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.step == 3 and resumed.resumed_from.name == "step_00000003"
    (root / "step_00000003" / "state.pt").unlink()  # nothing complete left: never start over silently
    for resume in (True, None):  # step_3 is now debris (removed at start); the one `latest` names stays
        with pytest.raises(FileNotFoundError, match=r"checkpoints holds step_00000006 but no "
                                                    r"complete checkpoint.*refusing to start over"):
            Trainer(cfg, resume=resume, progress=False)
        assert not (root / "step_00000003").exists() and (root / "step_00000006").is_dir()


def test_single_process_trainer_refuses_a_deepspeed_checkpoint(tmp_path):
    cfg = micro(tmp_path, steps=3)
    save_checkpoint(tmp_path, 2, {"step": 2, "engine": "deepspeed", "zero_stage": 1, "world_size": 2},
                    cfg.to_dict(), keep_last=2)
    with pytest.raises(ValueError, match=r"saved by the deepspeed backend \(ZeRO-1, 2 rank\(s\)\): "
                                         r".*resume it with engine.name=deepspeed.*d2v export"):
        Trainer(cfg, resume=True, progress=False)


def test_resume_may_switch_engine_name():
    """A launcher run (engine.name=auto) resumes with engine.name=deepspeed, and the other way round."""
    from d2v.config import check_resume_config

    auto = load_config(TINY, ["engine.name=auto"]).to_dict()
    named = load_config(TINY, ["engine.name=deepspeed"]).to_dict()
    check_resume_config(auto, named, "ck")
    check_resume_config(named, auto, "ck")


def _run_recorded(cfg) -> tuple[Trainer, list[dict]]:
    """Train and return each step's logged quantities, read at full precision right after the step."""
    from d2v.objective import STAT_KEYS

    tr = Trainer(cfg, progress=False)
    rows, step = [], tr.train_step

    def record(batches):
        res = step(batches)
        rows.append({k: float(res.out[k].detach()) for k in STAT_KEYS})
        return res

    tr.train_step = record
    tr.train()
    return tr, rows


def test_compile_traces_the_whole_step_as_one_graph(tmp_path, monkeypatch):
    """train.compile reaches the step: the forward (student, teacher, targets, loss) is captured as one graph
    with no graph break (a host read or data-dependent branch in the model would break it), with torch's own
    RNG for the decoder noise, and gives eager's losses. The backend is swapped for aot_eager here (no
    inductor build, seconds); test_compiled_step_matches_eager runs inductor."""
    import torch._dynamo

    real, seen = torch.compile, []

    def compile_aot_eager(model, *, options=None, **kw):
        seen.append(options)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, eager = _run_recorded(micro(tmp_path / "eager", steps=2))
    tr, compiled = _run_recorded(micro(tmp_path / "compiled", steps=2, **{"train.compile": True}))
    assert seen == [{"fallback_random": True}]
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for a, b in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-6)
    assert "torch.compile (default)" in tr.banner()
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path):
    """train.compile with inductor (a cold build takes minutes on 2 CPU cores): over 3 steps the same losses
    and weights as the eager step, up to float reassociation, and a checkpoint with the same keys."""
    eager_tr, eager = _run_recorded(micro(tmp_path / "eager", steps=3))
    comp_tr, compiled = _run_recorded(micro(tmp_path / "compiled", steps=3, **{"train.compile": True}))
    for a, b in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-5)
    sd_e, sd_c = eager_tr.model.state_dict(), comp_tr.model.state_dict()
    assert list(sd_e) == list(sd_c)
    for n in sd_e:
        torch.testing.assert_close(sd_c[n], sd_e[n], rtol=1e-4, atol=1e-6, msg=n)
