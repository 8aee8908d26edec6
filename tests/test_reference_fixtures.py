"""d2v against the real reference: tiny models that fairseq's own data2vec 2.0 code built, perturbed
and ran (tools/make_reference_fixtures.py; the files are in tests/fixtures/), imported with
`d2v import --from fairseq` and run by d2v on the same input and mask.

Checked per modality, to 1e-5 relative L2 (fp32 on both sides, same operations; what differs is
summation order, about 1e-7): the teacher's targets, the student's encoder output, the decoder output,
the losses and every parameter's gradient; and target_var / pred_var as the reference logs them.

The reference's loss terms are summed per element, unnormalized (fairseq's ModelCriterion); d2v's loss
is that sum divided by the number of masked tokens (the reference's sample_size, by which its trainer
divides the gradients), so d2v's loss and gradients are the reference's / sample_size.

Run: .venv/bin/python -m pytest -q tests/test_reference_fixtures.py
"""
from pathlib import Path

import pytest
import torch

from d2v.config import Config
from d2v.ema import EMATeacher
from d2v.interop.fairseq import import_fairseq
from d2v.interop.fairseq_keys import from_reference_tensor, reference_key
from d2v.masking import make_maskinfo
from d2v.model import build_model
from d2v.weights import load_weights

FIX = Path(__file__).resolve().parent / "fixtures"
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def imported(name: str, tmp_path: Path):
    """Fixture `name`'s checkpoint through the importer -> (model in train mode, teacher, config)."""
    kw = {"dict_path": FIX / "reference_text_dict.txt"} if name.startswith("text") else {}
    import_fairseq(FIX / f"reference_{name}_checkpoint.pt", tmp_path / "run", **kw)
    state, cfg_dict, _ = load_weights(tmp_path / "run")
    cfg = Config.from_dict(cfg_dict)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.train()
    e = cfg.ema
    return model, EMATeacher(model, e.ema_start, e.ema_end, e.anneal_end_step, init=state["teacher"]), cfg


# text_prenet: one prenet block, with the input LayerNorm the reference puts before it
@pytest.mark.parametrize("name", ["image", "audio", "text", "text_prenet"])
def test_d2v_computes_what_the_reference_computed(tmp_path, name):
    io = torch.load(FIX / f"reference_{name}_io.pt", weights_only=False)
    model, teacher, cfg = imported(name, tmp_path)
    modality = cfg.model.modality
    assert cfg.model.prenet_depth == (1 if name in ("image", "text_prenet") else 0)
    assert cfg.objective.decoder_noise_std == 0.0  # the fixture's mask_noise_std: no RNG to match
    source, mask = io["source"], make_maskinfo(io["mask"])
    # the reference keeps the same tokens (its order differs: an unstable argsort)
    assert torch.equal(mask.ids_keep, io["ids_keep"].sort(dim=1).values)

    seen = {}
    hooks = [model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("enc", o[0].detach())),
             model.modality_encoder.decoder.register_forward_hook(
                 lambda m, i, o: seen.__setitem__("dec", o.detach()))]
    stats = model(source, mask, teacher)
    for h in hooks:
        h.remove()
    stats["loss"].backward()

    with torch.no_grad():
        local, _ = model.modality_encoder.local_features(source)
        y = teacher.targets(source, local, model)  # (B, T, D)
    assert rel(y, io["targets"]) < TOL

    E = model.num_extra_tokens
    ref = io["encoder_out"]  # (R, E + K, D), kept tokens in the reference's ids_keep order
    order = io["ids_keep"].argsort(dim=1)  # -> ascending positions, d2v's order
    kept = torch.gather(ref[:, E:], 1, order[..., None].expand(-1, -1, ref.shape[-1]))  # (R, K, D)
    ref_sorted = torch.cat([ref[:, :E], kept], dim=1)
    assert rel(seen["enc"], ref_sorted) < TOL
    assert rel(seen["dec"], io["decoder_out"]) < TOL

    n = float(io["losses"]["sample_size"])
    reg = next(v for k, v in io["losses"].items() if k.endswith("_regression"))
    assert abs(stats["loss_reg"].item() - reg.sum().item() / n) < TOL * abs(reg.sum().item() / n)
    if "cls" in io["losses"]:
        want = io["losses"]["cls"].sum().item() / n
        assert abs(stats["loss_cls"].item() - want) < TOL * abs(want)
    assert abs(stats["loss"].item() - io["loss"].item() / n) < TOL * abs(io["loss"].item() / n)
    for k in ("target_var", "pred_var"):
        assert abs(stats[k].item() - io["logs"][k].item()) < 1e-4 * io["logs"][k].item(), k  # logged rounded

    H = cfg.model.num_heads
    ours = {reference_key(k, modality): p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(io["grads"])  # every parameter the reference trains, and only those
    for rk, g in io["grads"].items():
        d2v_key = next(k for k, _ in model.named_parameters() if reference_key(k, modality) == rk)
        want = from_reference_tensor(d2v_key, g, modality, H) / n
        assert rel(ours[rk], want) < TOL, rk


def test_fixture_checkpoints_round_trip_through_export(tmp_path):
    """import then export --format fairseq writes the reference's own keys, shapes and values."""
    from d2v.interop.fairseq import export_fairseq
    from d2v.interop.fairseq_keys import split_ema

    for name in ("image", "audio", "text", "text_prenet"):
        m = name.split("_")[0]
        kw = {"dict_path": FIX / "reference_text_dict.txt"} if m == "text" else {}
        import_fairseq(FIX / f"reference_{name}_checkpoint.pt", tmp_path / name, **kw)
        out, _ = export_fairseq(tmp_path / name, tmp_path / f"{name}.pt")
        ref = torch.load(FIX / f"reference_{name}_checkpoint.pt", weights_only=False)
        back = torch.load(out, weights_only=False)
        (rs, rt), (bs, bt) = split_ema(ref["model"]), split_ema(back["model"])
        assert set(rs) == set(bs) and set(rt) == set(bt), m
        for k in [*rs, *rt]:
            a, b = (rs | rt)[k], (bs | bt)[k]
            assert a.shape == b.shape and torch.equal(a, b), (m, k)
        assert back["optimizer_history"][-1]["num_updates"] == ref["optimizer_history"][-1]["num_updates"]
        for key, value in back["cfg"]["model"].items():  # what d2v writes, the reference had
            if key != "modalities":
                assert ref["cfg"]["model"].get(key) == value, (m, key)
        for key, value in back["cfg"]["model"]["modalities"][m].items():
            if key not in ("decoder", "feature_encoder_spec"):
                assert ref["cfg"]["model"]["modalities"][m].get(key) == value, (m, key)
