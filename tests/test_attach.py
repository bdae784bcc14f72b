"""stabilitylab.Monitor on plain PyTorch loops: grouping, signals, AMP, kNN and run files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import stabilitylab
from stabilitylab.config import derive
from stabilitylab.detect import detect_run
from stabilitylab.errors import ConfigError, RunDirError
from stabilitylab.methods.mocov3 import MoCoV3
from stabilitylab.monitor.attach import KnnEvaluation, Monitor
from stabilitylab.monitor.grouping import group_model, unwrap_model
from stabilitylab.report import write_report
from stabilitylab.runs import TABLE_COLUMNS, read_run
from stabilitylab.train.loop import build_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "instrument.md"


class BlockNet(nn.Module):
    """A small model with a stem, a ``blocks`` sequence and a head."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2
    )


def batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(size, 4), torch.randint(0, 3, (size,))


def train(model, optimizer, monitor, steps: int, scaler=None, images=None) -> list[float]:
    """Run ``steps`` plain steps and return the loss of each."""
    losses = []
    for _ in range(steps):
        x, y = batch() if images is None else (images(), torch.randint(0, 3, (8,)))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            monitor.after_backward(loss)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            monitor.after_backward(loss)
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.item())
    return losses


def total_grad_norm(model: nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    squared = sum(float(grad.double().pow(2).sum()) for grad in grads)
    return math.sqrt(squared)


# -- the documented example ------------------------------------------------------------------


def documented_example() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## A plain loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_example_adds_five_lines_at_most():
    code = documented_example()
    added = [line for line in code.splitlines() if line.rstrip().endswith("# added")]
    assert 1 <= len(added) <= 5


def test_docs_example_runs_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = documented_example()
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
    run_dir = Path(re.search(r'out="([^"]+)"', code).group(1))
    run = read_run(run_dir)
    assert run.status["state"] == "finished"
    assert len(run.steps) == run.status["step"]
    assert run.config["source"] == "monitor"
    assert run.config["freeze_patch_embed"] is False
    assert run.derived["layers"][0] == "patch_embed"
    assert np.isfinite(run.steps["token_grad_norm"]).all()
    report = write_report(run_dir)
    assert (report / "report.html").is_file()
    assert (report / "events.json").is_file()


# -- grouping -------------------------------------------------------------------------------


def test_grouping_timm_vit():
    grouping = group_model(tiny_vit())
    assert grouping.kind == "vit"
    assert grouping.names == [
        "patch_embed", "cls_token", "pos_embed", "blocks.00", "blocks.01", "norm", "head"
    ]  # fmt: skip
    assert grouping.first_block_name == "blocks.0"
    assert grouping.last_block == "blocks.01"


def test_grouping_torchvision_resnet18():
    model = torchvision.models.resnet18(weights=None)
    grouping = group_model(model)
    assert grouping.kind == "resnet"
    assert grouping.names == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert [name for name, _ in grouping.parameters_of("stem")] == [
        "conv1.weight", "bn1.weight", "bn1.bias"
    ]  # fmt: skip
    assert grouping.first_block is model.layer1


def test_grouping_generic_encoder_layers():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    model = nn.Module()
    model.embeddings = nn.Linear(4, 4)
    model.encoder = Encoder()
    model.pooler = nn.Linear(4, 4)
    grouping = group_model(model)
    assert grouping.kind == "generic"
    assert grouping.names == ["embeddings", "blocks.00", "blocks.01", "blocks.02", "pooler"]
    assert grouping.first_block is model.encoder.layer[0]


def test_grouping_every_parameter_once():
    model = torchvision.models.resnet18(weights=None)
    grouped = [name for _, members in group_model(model).groups for name, _ in members]
    assert sorted(grouped) == sorted(name for name, _ in model.named_parameters())


def test_grouping_mapping_longest_prefix():
    model = BlockNet()
    mapping = {"body": ["stem", "blocks"], "last": ["blocks.1"], "head": ["head"]}
    grouping = group_model(model, mapping)
    assert grouping.names == ["body", "last", "head"]
    assert [name for name, _ in grouping.parameters_of("last")] == [
        "blocks.1.weight", "blocks.1.bias"
    ]  # fmt: skip


def test_grouping_unmatched_parameter_error():
    with pytest.raises(ConfigError, match="'head.weight'"):
        group_model(BlockNet(), {"body": ["stem", "blocks"]})


def test_grouping_callable_none_for_trainable():
    with pytest.raises(ConfigError, match="'stem.weight'"):
        group_model(BlockNet(), lambda name: None)


def test_grouping_callable_error_names_parameter():
    def group_of(name: str) -> str:
        raise KeyError(name)

    with pytest.raises(ConfigError, match="raised KeyError.*'stem.weight'"):
        group_model(BlockNet(), group_of)


# -- a ViT inside a wrapper -----------------------------------------------------------------


def tiny_mocov3(tiny_config, frozen: bool = True) -> MoCoV3:
    """stabilitylab's own MoCo v3 module on an 8 px ViT, as stabilitylab run builds it."""
    config = tiny_config(img_size=8, freeze_patch_embed=frozen)
    return build_model(config, derive(config, train_size=1347, in_chans=1, num_classes=10))


def trainable_adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def optimizer_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_grouping_mocov3_online_vit(tiny_config):
    model = tiny_mocov3(tiny_config)
    grouping = group_model(model, owned=optimizer_ids(trainable_adamw(model)))
    blocks = [f"blocks.{index:02d}" for index in range(len(model.backbone.blocks))]
    assert grouping.kind == "vit"
    assert grouping.names == [
        "patch_embed", "cls_token", "pos_embed", *blocks, "norm", "projector", "predictor"
    ]  # fmt: skip
    assert grouping.vit.path == "backbone"
    assert grouping.vit.chosen_by == "optimizer"
    assert grouping.vit.candidates == ("backbone", "momentum_backbone")
    assert grouping.left_out == ["momentum_backbone", "momentum_projector"]
    assert grouping.first_block is model.backbone.blocks[0]
    assert grouping.last_block == blocks[-1]


def test_grouping_mocov3_ema_parameters_left_out(tiny_config):
    model = tiny_mocov3(tiny_config)
    grouped = {id(p) for _, members in group_model(model).groups for _, p in members}
    momentum = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert not grouped & {id(p) for p in momentum}
    assert {id(p) for p in model.backbone.parameters()} <= grouped


def test_grouping_nested_path_groups():
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.backbone = tiny_vit()
    model.encoder.proj = nn.Linear(16, 8)
    grouping = group_model(model)
    assert grouping.vit.path == "encoder.backbone"
    assert grouping.vit.chosen_by == "only"
    assert grouping.names[0] == "patch_embed"
    assert grouping.names[-2:] == ["head", "encoder.proj"]
    assert grouping.first_block_name == "encoder.backbone.blocks.0"


def test_grouping_compiled_vit_unwrapped():
    model = tiny_vit()
    compiled = torch.compile(model)  # compiles at the first call, so this only wraps
    assert type(compiled).__name__ == "OptimizedModule"
    assert unwrap_model(compiled) is model
    assert group_model(unwrap_model(compiled)).names == group_model(model).names


def test_grouping_orig_mod_child():
    wrapper = nn.Module()
    wrapper._orig_mod = tiny_vit()
    grouping = group_model(wrapper)
    assert grouping.names == group_model(tiny_vit()).names
    assert grouping.vit.path == "_orig_mod"


def mocov3_steps(model: MoCoV3, optimizer, monitor, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.rand(8, 1, 8, 8, generator=generator)
        loss = model(images, images.flip(-1))
        optimizer.zero_grad()
        loss.backward()
        monitor.after_backward(loss, momentum=0.99)
        optimizer.step()
        model.update_momentum_encoder(0.99)


def test_monitor_mocov3_frozen_arm(tiny_config, tmp_path):
    model = tiny_mocov3(tiny_config, frozen=True)
    optimizer = trainable_adamw(model)
    with Monitor(model, optimizer, out=tmp_path / "run", config={"seed": 0}) as monitor:
        mocov3_steps(model, optimizer, monitor, steps=3)
    run = stabilitylab.load_run(tmp_path / "run")
    assert run.config["freeze_patch_embed"] is True
    assert run.arm == "frozen"
    assert run.frozen_check["passed"] is True
    assert run.derived["vit"]["path"] == "backbone"
    assert run.derived["vit"]["chosen_by"] == "optimizer"
    assert run.derived["left_out"] == ["momentum_backbone", "momentum_projector"]
    assert run.first_layer == "token_grad_norm"
    assert run.last_layer == f"grad_norm[blocks.{len(model.backbone.blocks) - 1:02d}]"
    assert np.isfinite(run.steps["token_grad_norm"]).all()


def test_monitor_mocov3_learned_arm(tiny_config, tmp_path):
    model = tiny_mocov3(tiny_config, frozen=False)
    optimizer = trainable_adamw(model)
    with Monitor(model, optimizer, out=tmp_path / "run") as monitor:
        mocov3_steps(model, optimizer, monitor, steps=2)
    run = stabilitylab.load_run(tmp_path / "run")
    assert run.config["freeze_patch_embed"] is False
    assert run.arm == "learned"
    assert run.first_layer == "grad_norm[patch_embed]"
    assert run.frozen_check is None


# -- signals --------------------------------------------------------------------------------


def test_monitor_rows_and_columns(tmp_path):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    out = tmp_path / "run"
    settings = {"flush_every": 2, "steps_per_epoch": 2, "samples_per_step": 8}
    with Monitor(model, optimizer, out=out, **settings) as monitor:
        losses = train(model, optimizer, monitor, steps=5)
    run = read_run(out)
    assert list(run.steps["step"]) == [0, 1, 2, 3, 4]
    assert list(run.steps["epoch"]) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert (run.steps["samples_per_s"] > 0).all()
    assert np.allclose(run.steps["loss"], losses)
    assert (run.steps["momentum"] == 0.9).all()
    assert (run.steps["weight_decay"] == 1e-4).all()
    assert (run.steps["lr"] == 0.1).all()
    assert len(run.layers) == 5 * 4
    assert run.derived["layers"] == ["stem", "blocks.00", "blocks.01", "head"]
    assert "freeze_patch_embed" not in run.config


def test_monitor_grad_norm_matches_reference(tmp_path):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    optimizer.register_step_pre_hook(lambda *_: expected.append(total_grad_norm(model)))
    with Monitor(model, optimizer, out=tmp_path / "run") as monitor:
        train(model, optimizer, monitor, steps=3)
    recorded = read_run(tmp_path / "run").steps["grad_norm"].to_numpy()
    assert np.allclose(recorded, expected, rtol=1e-5)


def test_frozen_patch_embed_records_nan(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit()
    for parameter in model.patch_embed.parameters():
        parameter.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    with Monitor(model, optimizer, out=tmp_path / "run") as monitor:
        train(model, optimizer, monitor, steps=3, images=lambda: torch.randn(8, 1, 8, 8))
    run = read_run(tmp_path / "run")
    patch = run.layers[run.layers["layer"] == "patch_embed"]
    assert patch["grad_norm"].isna().all()
    assert patch["update_ratio"].isna().all()
    assert np.isfinite(patch["weight_norm"]).all()
    assert np.isfinite(run.steps["token_grad_norm"]).all()
    assert run.config["freeze_patch_embed"] is True
    assert run.arm == "frozen"
    assert run.frozen_check["passed"] is True


def test_accumulation_one_row_per_step(tmp_path):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected_norms, expected_losses = [], []
    monitor = Monitor(model, optimizer, out=tmp_path / "run", accumulation_steps=3)
    with monitor:
        for _ in range(2):
            optimizer.zero_grad()
            step_loss = 0.0
            for _ in range(3):
                x, y = batch()
                loss = nn.functional.cross_entropy(model(x), y) / 3
                loss.backward()
                monitor.after_backward(loss)
                step_loss += loss.item()
            expected_norms.append(total_grad_norm(model))
            expected_losses.append(step_loss)
            optimizer.step()
    run = read_run(tmp_path / "run")
    assert list(run.steps["step"]) == [0, 1]
    assert np.allclose(run.steps["grad_norm"], expected_norms, rtol=1e-5)
    assert np.allclose(run.steps["loss"], expected_losses, rtol=1e-5)
    assert run.status["backward_passes_per_step"] == {"3": 2}
    assert run.status["accumulation_mismatches"] == 0


def test_amp_scaler_unscaled_norms(tmp_path):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    expected = []
    optimizer.register_step_pre_hook(lambda *_: expected.append(total_grad_norm(model)))
    with Monitor(model, optimizer, out=tmp_path / "run", scaler=scaler) as monitor:
        train(model, optimizer, monitor, steps=2, scaler=scaler)
    run = read_run(tmp_path / "run")
    assert np.allclose(run.steps["grad_norm"], expected, rtol=1e-5)
    assert (run.steps["loss_scale"] == 1024.0).all()
    assert "step" not in scaler.__dict__  # close() restored the scaler's own method


def test_amp_skipped_step_recorded(tmp_path):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with Monitor(model, optimizer, out=tmp_path / "run", scaler=scaler) as monitor:
        for step in range(3):
            x, y = batch()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            monitor.after_backward(loss)
            if step == 1:
                model.head.weight.grad[0, 0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
    run = read_run(tmp_path / "run")
    skipped = run.layers[run.layers["step"] == 1]
    assert list(run.steps["step"]) == [0, 1, 2]
    assert run.status["skipped_steps"] == [1]
    assert not np.isfinite(run.steps["grad_norm"][1])
    assert (skipped["update_ratio"] == 0.0).all()
    assert list(run.steps["loss_scale"]) == [1024.0, 1024.0, 512.0]
    assert detect_run(run).spikes["grad_norm"] == []


def test_no_host_sync_during_steps(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = Monitor(model, optimizer, out=tmp_path / "run", flush_every=100)
    inputs = [batch() for _ in range(4)]

    def host_sync(*args, **kwargs):
        raise AssertionError("a monitored step read a tensor back to the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, host_sync)
        for x, y in inputs:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(loss)
            optimizer.step()
    monitor.close()
    assert len(read_run(tmp_path / "run").steps) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sync debug mode needs CUDA")
def test_no_host_sync_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = BlockNet().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = Monitor(model, optimizer, out=tmp_path / "run", flush_every=100)
    inputs = [tuple(t.cuda() for t in batch()) for _ in range(5)]
    try:
        for index, (x, y) in enumerate(inputs):
            if index == 1:  # the first step, outside the check, caches the group indices
                torch.cuda.set_sync_debug_mode("error")
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(loss)
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monitor.close()
    assert len(read_run(tmp_path / "run").steps) == 5


# -- kNN ------------------------------------------------------------------------------------


def knn_loader(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(30) % 3
    images = torch.randn(30, 4, generator=generator) + labels[:, None].float()
    return [(images[:15], labels[:15]), (images[15:], labels[15:])]


def test_knn_option_writes_evals(tmp_path):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    knn = KnnEvaluation(model.features, knn_loader(1), knn_loader(2), every=2, k=5)
    with Monitor(model, optimizer, out=tmp_path / "run", knn=knn) as monitor:
        train(model, optimizer, monitor, steps=5)
    run = read_run(tmp_path / "run")
    assert tuple(run.evals.columns) == TABLE_COLUMNS["evals"]
    assert list(run.evals["step"]) == [0, 2, 4, 5]
    assert (run.evals["n_query"] == 30).all()
    assert run.evals["knn_top1_se"].notna().all()
    assert all(isinstance(hits, bytes) for hits in run.evals["knn_correct"])
    assert run.status["final_knn_top1"] == run.evals["knn_top1"].iloc[-1]
    assert model.training


def test_evaluate_knn_call(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, out=tmp_path / "run") as monitor:
        result = monitor.evaluate_knn(model.features, knn_loader(1), knn_loader(2), k=5)
    evals = read_run(tmp_path / "run").evals
    assert evals["knn_top1"].tolist() == [result.top1]
    assert result.n_bank == 30


# -- run directory --------------------------------------------------------------------------


def test_existing_out_rejected(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Monitor(model, optimizer, out=tmp_path / "run").close()
    with pytest.raises(RunDirError, match="overwrite=True"):
        Monitor(model, optimizer, out=tmp_path / "run")
    Monitor(model, optimizer, out=tmp_path / "run", overwrite=True).close()
    assert read_run(tmp_path / "run").status["state"] == "finished"


def test_bad_grouping_leaves_no_folder(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError):
        Monitor(model, optimizer, out=tmp_path / "run", groups={"stem": ["stem"]})
    assert not (tmp_path / "run").exists()


def test_exception_writes_failed(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError), Monitor(model, optimizer, out=tmp_path / "run") as monitor:
        train(model, optimizer, monitor, steps=2)
        raise ValueError("data loader broke")
    run = read_run(tmp_path / "run")
    assert run.status["state"] == "failed"
    assert "data loader broke" in run.status["reason"]
    assert len(run.steps) == 2


def test_nonfinite_loss_stops_recording(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, out=tmp_path / "run", flush_every=3) as monitor:
        for step in range(6):
            x, y = batch()
            loss = nn.functional.cross_entropy(model(x), y) * (math.nan if step == 1 else 1.0)
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(loss)
            optimizer.step()
    run = read_run(tmp_path / "run")
    assert run.status["state"] == "failed"
    assert run.status["step"] == 1
    assert list(run.steps["step"]) == [0, 1]
    assert run.status["backward_passes_per_step"] == {"1": 2}


def test_step_without_loss_raises(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, out=tmp_path / "run")
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(stabilitylab.TrainingError, match="after_backward"):
        optimizer.step()
    monitor.close()


def test_config_json_contents(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    Monitor(model, optimizer, out=tmp_path / "run", config={"seed": 3, "lr": 1e-3}).close()
    payload = json.loads((tmp_path / "run" / "config.json").read_text())
    assert payload["format_version"] == 1
    assert payload["config"] == {"seed": 3, "lr": 1e-3, "source": "monitor"}
    assert payload["derived"]["grouping"] == "generic"
    assert payload["derived"]["first_block"] == "blocks.0"
    assert payload["environment"]["seed"] == 3


def test_config_numpy_and_tensor_values(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {
        "lr": np.float32(0.5),
        "seed": np.int64(3),
        "scale": torch.tensor(2.0),
        "steps": torch.tensor(7),
        "flags": {"amp": np.bool_(True)},
        "betas": (0.9, np.float64(0.95)),
    }
    Monitor(model, optimizer, out=tmp_path / "run", config=config).close()
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert stored["lr"] == 0.5
    assert stored["seed"] == 3
    assert stored["scale"] == 2.0
    assert stored["steps"] == 7
    assert stored["flags"] == {"amp": True}
    assert stored["betas"] == [0.9, 0.95]
    assert isinstance(stored["seed"], int)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a", "b"}, r"config\['bad'\] is a set"),
        (nn.Linear(2, 2), r"config\['bad'\] is a Linear"),
        (float("nan"), r"config\['bad'\] is nan"),
        ({"inner": float("inf")}, r"config\['bad'\]\['inner'\] is inf"),
        (torch.ones(3), r"config\['bad'\] is a tensor of shape \(3,\)"),
        (Path("data"), r"config\['bad'\] is a PosixPath|config\['bad'\] is a WindowsPath"),
    ],
)
def test_config_value_without_json_rejected(tmp_path, value, expected):
    model = BlockNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match=expected):
        Monitor(model, optimizer, out=tmp_path / "run", config={"bad": value})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("loss", ["2.5", None, [1.0]])
def test_after_backward_rejects_non_number(tmp_path, loss):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, out=tmp_path / "run") as monitor:
        with pytest.raises(ConfigError, match="as the loss"):
            monitor.after_backward(loss)


def test_all_frozen_model_rejected(tmp_path):
    model = BlockNet().requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="every parameter of the model"):
        Monitor(model, optimizer, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_partial_optimizer_warns(tmp_path, caplog):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="stabilitylab.monitor.attach"):
        Monitor(model, optimizer, out=tmp_path / "run").close()
    assert "are not in the optimizer" in caplog.text
    assert "stem.weight" in caplog.text


def test_closure_optimizer_rejected(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1)
    x, y = batch()
    monitor = Monitor(model, optimizer, out=tmp_path / "run")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        monitor.after_backward(loss)
        return loss

    with pytest.raises(stabilitylab.TrainingError, match="closure optimizers such as LBFGS"):
        optimizer.step(closure)
    monitor.close()


def test_knn_k_above_bank_rejected(tmp_path):
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    knn = KnnEvaluation(model.features, knn_loader(1), knn_loader(2), every=2, k=40)
    with pytest.raises(ConfigError, match="k=40 is more than the 30 images"):
        Monitor(model, optimizer, out=tmp_path / "run", knn=knn)
    assert not (tmp_path / "run").exists()


def test_amp_nonfinite_loss_skipped_not_diverged(tmp_path):
    torch.manual_seed(0)
    model = BlockNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with Monitor(model, optimizer, out=tmp_path / "run", scaler=scaler) as monitor:
        for step in range(4):
            x, y = batch()
            loss = nn.functional.cross_entropy(model(x), y) * (math.inf if step == 1 else 1.0)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            monitor.after_backward(loss)
            scaler.step(optimizer)
            scaler.update()
    run = stabilitylab.load_run(tmp_path / "run")
    assert run.state == "finished"
    assert list(run.steps["step"]) == [0, 1, 2, 3]
    assert run.status["skipped_steps"] == [1]
    assert not np.isfinite(run.steps["loss"][1])
    assert run.verdict != "diverged"
