"""The bag of tricks (README "Tricks"): each switch does what it claims, checked against an
independent computation on a small network or a hand example. The training run that combines
them is in test_train.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import cli
from torch import nn

from pneumoseg.layers import batch_norms, group_count, to_sync_batch_norm
from pneumoseg.losses import ComboLoss
from pneumoseg.models import build_model, load_model_file, plain_smp_rebuilds, save_model_file
from pneumoseg.params import LossParams, ModelParams, Params, ParamsError, load_params
from pneumoseg.training.distributed import Dist
from pneumoseg.training.parts import make_ema, make_optimizer, part_optimizer

TINY = {"decoder_channels": [32, 16, 16, 8, 8]}


def model(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelParams(**(TINY | kw)))  # type: ignore[arg-type]


def count(net: nn.Module, name: str) -> int:
    return sum(type(m).__name__ == name for m in net.modules())


def test_scse_puts_attention_in_every_decoder_block_and_still_predicts() -> None:
    plain, scse = model(), model(decoder_attention="scse")
    assert count(plain, "SCSEModule") == 0
    assert count(scse, "SCSEModule") == 10  # two per decoder block, five blocks
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a, b = plain.eval()(x), scse.eval()(x)
    assert a.shape == b.shape == (2, 1, 64, 64) and not torch.allclose(a, b)
    # the 8-channel blocks get a one-channel squeeze (smp's C // 16 would be empty)
    squeezes = [m.cSE[1].out_channels for m in scse.modules() if type(m).__name__ == "SCSEModule"]
    assert min(squeezes) == 1
    assert not plain_smp_rebuilds(ModelParams(**TINY, decoder_attention="scse"))
    assert plain_smp_rebuilds(ModelParams(decoder_channels=None, decoder_attention="scse"))


def test_group_norm_leaves_no_batchnorm_and_round_trips_through_the_model_file(
    tmp_path: Path,
) -> None:
    plain, grouped = model(), model(norm="group")
    n_bn = len(batch_norms(plain))
    assert n_bn > 0 and batch_norms(grouped) == []
    groups = [m for m in grouped.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == n_bn
    assert all(g.num_channels % g.num_groups == 0 for g in groups)
    # fused timm activations survive: same activation modules before and after
    acts = [type(m).__name__ for m in plain.modules() if isinstance(m, (nn.ReLU, nn.Hardswish))]
    acts_g = [type(m).__name__ for m in grouped.modules() if isinstance(m, (nn.ReLU, nn.Hardswish))]
    assert acts == acts_g
    # at least 4 channels a group
    assert [group_count(c) for c in (8, 16, 24, 96, 576)] == [2, 4, 4, 16, 32]
    # a batch of one trains: GroupNorm does not need a batch
    grouped.train()(torch.randn(1, 1, 64, 64)).sum().backward()
    meta = {"arch": "Unet", "encoder": "tu-mobilenetv3_small_100", "in_channels": 1}
    meta |= {"decoder_channels": TINY["decoder_channels"], "norm": "group"}
    save_model_file(tmp_path / "m.pt", grouped.state_dict(), meta)
    loaded, _ = load_model_file(tmp_path / "m.pt")
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), grouped.eval()(x))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x, y = torch.randn(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.7).float()
    grads = []
    for checkpointing in (False, True):
        net = model().train()
        if checkpointing:
            from pneumoseg.layers import enable_grad_checkpointing

            enable_grad_checkpointing(net)
            assert net.encoder.model.grad_checkpointing
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys()
    worst = max(float((plain[k] - ckpt[k]).abs().max()) for k in plain)
    assert worst < 1e-5, worst


def test_label_smoothing_changes_bce_by_s_times_the_logit() -> None:
    """Target 1, logit x: bce = softplus(-x); with smoothing s the target is 1 - s, so
    bce = (1 - s) softplus(-x) + s softplus(x) = softplus(-x) + s x."""
    logits, target = torch.full((1, 1, 4, 4), 2.0), torch.ones(1, 1, 4, 4)
    plain, _ = ComboLoss(LossParams(bce=1, dice=0))(logits, target)
    smooth, _ = ComboLoss(LossParams(bce=1, dice=0, label_smoothing=0.1))(logits, target)
    assert float(plain) == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    assert float(smooth - plain) == pytest.approx(0.1 * 2.0, rel=1e-5)


def test_jaccard_and_reduced_focal_match_hand_values() -> None:
    logits = torch.tensor([[[[20.0, 20.0], [20.0, 20.0]]]])  # p = 1 everywhere
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    value, parts = ComboLoss(LossParams(bce=0, dice=0, jaccard=1))(logits, target)
    assert float(parts["jaccard"]) == pytest.approx(1 - 2 / 4, abs=1e-4)  # |A&B| / |A|B|
    # one pixel, logit 2, target 1: p_t = sigmoid(2); reduced weight ((1 - p_t) / 0.5) ** 2
    x, t = torch.full((1, 1, 1, 1), 2.0), torch.ones(1, 1, 1, 1)
    pt, bce = 1 / (1 + math.exp(-2.0)), math.log1p(math.exp(-2.0))
    _, focal = ComboLoss(LossParams(bce=0, dice=0, focal=1))(x, t)
    _, reduced = ComboLoss(LossParams(bce=0, dice=0, focal=1, focal_reduced_threshold=0.5))(x, t)
    assert float(focal["focal"]) == pytest.approx((1 - pt) ** 2 * bce, rel=1e-4)
    assert float(reduced["focal"]) == pytest.approx(((1 - pt) / 0.5) ** 2 * bce, rel=1e-4)


def test_a_part_hands_over_from_adam_to_sgd_and_inherits_the_rest() -> None:
    params = Params.model_validate(
        {
            "train": {
                "optimizer": {"name": "adam", "weight_decay": 0.01, "momentum": 0.8},
                "swa": {"epochs": 1},
                "parts": [
                    {"epochs": 2},
                    {"epochs": 2, "lr": 0.01, "optimizer": {"name": "sgd", "momentum": 0.95}},
                    {"epochs": 2, "optimizer": {"name": "sgd"}},
                ],
            }
        }
    )
    cfg, net = params.train, nn.Linear(2, 1)
    first, second, third = (make_optimizer(cfg, net, p) for p in cfg.parts)
    assert type(first) is torch.optim.Adam and first.defaults["weight_decay"] == 0.01
    assert type(second) is torch.optim.SGD
    assert second.defaults["momentum"] == 0.95 and second.defaults["weight_decay"] == 0.01
    assert second.defaults["lr"] == 0.01
    assert part_optimizer(cfg, cfg.parts[2]).momentum == 0.8  # the train-level momentum


def test_snapshot_cycles_follow_the_restart_schedule() -> None:
    from pneumoseg.params import PartParams, SchedulerParams
    from pneumoseg.training.parts import cycle_ends

    def ends(epochs: int, t0: int, mult: int, warm: int) -> list[int]:
        sched = SchedulerParams(
            name="cosine_restarts", restart_epochs=t0, restart_mult=mult, warmup_epochs=warm
        )
        return cycle_ends(PartParams(epochs=epochs, scheduler=sched))

    assert ends(7, 2, 1, 1) == [2, 4, 6]  # warm-up epoch 0, then cycles 1-2, 3-4, 5-6
    assert ends(10, 2, 2, 0) == [1, 5]  # cycles of 2 and 4 epochs; the last 4 are incomplete
    assert cycle_ends(PartParams()) == []  # cosine: no restarts


def test_ema_is_the_exponential_average_of_the_steps() -> None:
    net = nn.Linear(1, 1, bias=False)
    ema = make_ema(net, 0.9)
    assert ema is not None and make_ema(net, 0.0) is None
    values = [1.0, 2.0, 4.0]
    expected = None
    for v in values:
        with torch.no_grad():
            net.weight.fill_(v)
        ema.update_parameters(net)
        expected = v if expected is None else 0.9 * expected + 0.1 * v
    assert float(ema.module.weight) == pytest.approx(expected)  # 1 -> 1.1 -> 1.39


def test_sync_batchnorm_converts_every_batchnorm_and_refuses_cpu_ranks() -> None:
    synced = to_sync_batch_norm(model())
    assert all("Sync" in type(bn).__name__ for bn in batch_norms(synced))
    with pytest.raises(ValueError, match=r"train\.model\.sync_bn: .*CUDA"):
        Dist(rank=0, world_size=2).wrap(model(), torch.device("cpu"), sync_bn=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": {"arch": "FPN", "decoder_attention": "scse"}}, "train.model.decoder_attention"),
        ({"model": {"norm": "layer"}}, "train.model.norm"),
        ({"model": {"norm": "group", "sync_bn": True}}, "train.model.sync_bn"),
        ({"model": {"norm": "frozen_batch", "freeze_bn_from_part": -1}}, "freeze_bn_from_part"),
        ({"model": {"encoder": "resnet18"}, "grad_checkpointing": True}, "grad_checkpointing"),
        ({"checkpoint": {"final": "ema"}}, "train.checkpoint.final"),
        ({"ema": {"decay": 1.0}}, "train.ema.decay"),
        ({"parts": [{"loss": {"bce": 0, "label_smoothing": 0.1}}]}, "label_smoothing"),
        ({"parts": [{"loss": {"focal_reduced_threshold": 0.5}}]}, "focal_reduced_threshold"),
        ({"parts": [{"optimizer": {"name": "lamb"}}]}, "train.parts[0].optimizer.name"),
    ],
)
def test_bad_trick_values_name_their_key(tmp_path: Path, overrides: dict, message: str) -> None:
    path = tmp_path / "params.yaml"
    swa = {} if "parts" not in overrides else {"swa": {"epochs": 1}}
    path.write_text(yaml.safe_dump({"train": swa | overrides}))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    first = str(info.value).splitlines()[0]
    assert first.startswith("params.yaml: ") and message in first, first


def test_a_bad_trick_stops_the_cli_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"model": {"norm": "layer"}}}))
    code, _, err = cli("train", "--fold", "0", cwd=tmp_path, check=False)
    assert code == 2 and "train.model.norm" in err and len(err.strip().splitlines()) == 1


def test_the_freebies_study_searches_tricks_the_schema_accepts() -> None:
    study = Params().studies["freebies"]
    assert {"train.model.decoder_attention", "train.model.norm"} <= set(study.space)
    assert any(key.endswith("loss.label_smoothing") for key in study.space)


def test_tta_views_average_and_a_neutral_view_changes_nothing(tmp_path: Path) -> None:
    from pneumoseg.inference import Ensemble

    meta = {"arch": "Unet", "encoder": "tu-mobilenetv3_small_100", "in_channels": 1}
    meta |= {"decoder_channels": TINY["decoder_channels"], "size": 64}
    save_model_file(tmp_path / "m.pt", model().state_dict(), meta)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(3)]

    def probs(**tta: list[float]) -> np.ndarray:
        ensemble = Ensemble([tmp_path / "m.pt"], tta_hflip=True, **tta)  # type: ignore[arg-type]
        return ensemble.predict(images)[0]

    plain = probs()
    neutral = probs(tta_scales=[1.0], tta_gammas=[1.0])  # the plain view three times
    np.testing.assert_allclose(neutral, plain, atol=1e-6)
    # by hand: each view through the network, mapped back (unflipped, resized to 64 px), then
    # the mean of the views with and without the horizontal flip
    from pneumoseg.data import to_tensor

    net, _ = load_model_file(tmp_path / "m.pt")
    net.eval()

    def view(batch: list[np.ndarray], side: int = 64) -> torch.Tensor:
        x = torch.stack([to_tensor(image, 1) for image in batch])
        if side != 64:
            x = nn.functional.interpolate(x, size=(side, side), mode="bilinear")
        out = []
        with torch.no_grad():
            for flip in (False, True):
                p = torch.sigmoid(net(torch.flip(x, dims=[3]) if flip else x))
                p = torch.flip(p, dims=[3]) if flip else p
                out.append(nn.functional.interpolate(p, size=(64, 64), mode="bilinear"))
        return torch.stack(out)

    lut = np.round(255.0 * (np.arange(256) / 255.0) ** 0.5).astype(np.uint8)
    expected = {
        "tta_scales": torch.cat([view(images), view(images, 96)]),  # 64 * 1.5 = 96 px
        "tta_gammas": torch.cat([view(images), view([lut[image] for image in images])]),
    }
    assert np.abs(probs(tta_scales=[1.5]) - probs()).max() > 1e-4  # the views do differ
    for key, value in (("tta_scales", [1.5]), ("tta_gammas", [0.5])):
        by_hand = expected[key].mean(dim=0)[:, 0].numpy()
        np.testing.assert_allclose(probs(**{key: value}), by_hand, atol=1e-5)


def test_local_encoder_weights_are_counted_and_a_partial_file_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local weights file: what it filled is reported; one that fills less than
    model.encoder_weights_min_loaded of the encoder (another encoder's, a truncated file) is
    refused with one line, unless the key allows it; the tensors loaded are the file's."""
    import logging

    from pneumoseg.models import ModelError

    source = model().encoder.state_dict()
    full, partial = tmp_path / "full.pth", tmp_path / "partial.pth"
    torch.save({f"encoder.{k}": v + 1 for k, v in source.items()}, full)
    keep = sorted(source, key=lambda k: source[k].numel())[: len(source) // 2]  # small ones
    torch.save({k: source[k] + 1 for k in keep}, partial)
    with caplog.at_level(logging.INFO, logger="pneumoseg.models"):
        net = model(encoder_weights=str(full))
    loaded = net.encoder.state_dict()
    floats = [k for k in source if source[k].is_floating_point()]
    assert all(torch.equal(loaded[k], source[k] + 1) for k in floats)
    (line,) = [r.getMessage() for r in caplog.records if str(full) in r.getMessage()]
    assert f"loaded {len(source)} of the encoder's {len(source)} tensors (100.0%" in line
    with pytest.raises(ModelError, match=r"encoder_weights_min_loaded \(90%\)") as err:
        model(encoder_weights=str(partial))
    assert f"loaded {len(keep)} of the encoder's {len(source)} tensors" in str(err.value)
    assert "\n" not in str(err.value)
    net = model(encoder_weights=str(partial), encoder_weights_min_loaded=0.0)
    got = net.encoder.state_dict()
    assert all(torch.equal(got[k], source[k] + 1) for k in keep if source[k].is_floating_point())
