"""Using the kernels in other projects: import isolation, the module hook, the Lightning callback,
and the whole path a newcomer takes (wheel -> fresh venv -> their own Lightning project)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.lightning import TritonAttention
from kernels.sdpa import torch_sdpa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_kernels_imports_no_zoo_tasks_lightning_timm_torchaudio():
    code = ("import sys, kernels, kernels.routing; "
            "print([m for m in ('zoo', 'tasks', 'lightning', 'pytorch_lightning', 'timm', 'torchaudio', "
            "'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                            num_heads=4, num_classes=10)


def test_module_hook_routes_and_reports():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    with kernels.triton_attention(model) as handle:
        out = model(x)
        assert F.scaled_dot_product_attention is torch_sdpa  # patched only during the forward
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert handle.report() == {"served": 2, "fell_back": 0, "fallback_reasons": {}}
    model(x)  # removed: no longer counted
    assert handle.report()["served"] == 2


class _Float64Attention(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


class _Raises(torch.nn.Module):
    def forward(self, q):
        F.scaled_dot_product_attention(q, q, q)
        raise RuntimeError("the model failed")


def test_patch_ends_with_a_forward_that_raises_and_nested_hooks_count_apart():
    failing = _Raises()
    handle = kernels.triton_attention(failing)
    with pytest.raises(RuntimeError, match="the model failed"):
        failing(torch.randn(1, 2, 4, 8))
    report = handle.report()
    assert F.scaled_dot_product_attention is torch_sdpa and report["served"] + report["fell_back"] == 1
    handle.remove()
    # A hook on a module and on its child: equal counts in two open scopes must not be confused.
    inner = _Float64Attention()
    outer = torch.nn.Sequential(inner, torch.nn.Identity())
    with kernels.triton_attention(outer) as h_outer, kernels.triton_attention(inner) as h_inner:
        outer(torch.randn(1, 2, 4, 8, dtype=torch.float64))
        assert h_outer.report()["fell_back"] == 1 and h_inner.report()["fell_back"] == 1
    with kernels.record_routing() as first, kernels.record_routing() as second:
        kernels.scaled_dot_product_attention(*(torch.randn(1, 1, 2, 4, dtype=torch.float64),) * 3)
    assert sum(first.values()) == sum(second.values()) == 1
    assert F.scaled_dot_product_attention is torch_sdpa


def test_module_hook_reports_fallbacks_with_reasons():
    module = _Float64Attention()
    handle = kernels.triton_attention(module)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(module(q), torch_sdpa(q, q, q), rtol=0, atol=0)
    report = handle.report()
    assert report["served"] == 0 and report["fell_back"] == 1
    (reason,) = report["fallback_reasons"]
    assert "float64" in reason
    handle.remove()


class _TimmClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _vit()
        self.losses = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_lightning_callback_serves_the_run_and_matches_it():
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    losses, callback = {}, TritonAttention(verbose=False)
    for name, callbacks in (("plain", []), ("triton", [callback])):
        module = _TimmClassifier()
        L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=callbacks).fit(
            module, torch.utils.data.DataLoader(data, batch_size=4))
        losses[name] = module.losses
    assert F.scaled_dot_product_attention is torch_sdpa  # restored after the run
    report = callback.report()
    assert report["served"] == 3 * 2 and report["fell_back"] == 0  # 3 steps x 2 blocks
    assert losses["triton"] == pytest.approx(losses["plain"], abs=1e-4)


class _FailingStep(_TimmClassifier):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        raise ValueError("a bad batch")


def test_lightning_callback_restores_torch_when_the_run_raises():
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TritonAttention(verbose=False)])
    with pytest.raises(ValueError, match="a bad batch"):
        trainer.fit(_FailingStep(), torch.utils.data.DataLoader(data, batch_size=4))
    assert F.scaled_dot_product_attention is torch_sdpa


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_an_outside_lightning_project(tmp_path):
    """Build the wheel, install it with the constraints into a new venv outside the repository,
    and train someone else's small Lightning project with and without the callback."""
    # Everything runs outside the checkout, without PYTHONPATH: `python -m pip` puts the working
    # directory on sys.path, and the checkout's tritonzoo.egg-info would pass for an installed
    # tritonzoo (pip would then skip installing the wheel).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    source = tmp_path / "source"  # a copy without build/ leftovers of earlier builds
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", "build", "dist", "runs", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", ".git"))
    dist = tmp_path / "dist"

    def call(*args, check=True, **kw):
        return subprocess.run([str(a) for a in args], cwd=tmp_path, env=env, check=check, **kw)

    call(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source)
    (wheel,) = glob.glob(str(dist / "tritonzoo-*.whl"))
    venv = tmp_path / "venv"
    call(shutil.which("python3") or sys.executable, "-m", "venv", venv)
    python = str(venv / "bin" / "python")
    call(python, "-m", "pip", "install", "-q", "-c", os.path.join(REPO, "constraints.txt"), wheel, "timm", "lightning")
    # The kernels need torch and triton only: with numpy unimportable (timm and lightning brought
    # it here) they import and compute on the PyTorch path, flags checked as bools.
    probe = ("import sys; sys.modules['numpy'] = None\n"
             "import torch, kernels\n"
             "q = torch.randn(1, 5, 2, 8, dtype=torch.float64).float()\n"
             "out = kernels.flash_attn_func(q, q, q, causal=True)\n"
             "ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3, is_causal=True)\n"
             "assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)\n"
             "cos, sin = torch.rand(5, 4), torch.rand(5, 4)\n"
             "kernels.apply_rotary_emb(q, cos, sin, interleaved=True)\n"
             "try:\n    kernels.apply_rotary_emb(q, cos, sin, interleaved=1)\nexcept TypeError as e:\n    print(e)\n")
    # Without the interpreter, which imports numpy itself.
    no_numpy = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                              env={k: v for k, v in env.items() if k != "TRITON_INTERPRET"})
    assert no_numpy.returncode == 0, no_numpy.stderr[-3000:]
    assert "interleaved must be a bool" in no_numpy.stdout
    project = tmp_path / "their_project"
    shutil.copytree(os.path.join(REPO, "tests", "reuse_project"), project)
    env["TRITON_INTERPRET"] = "1"  # no GPU: the Triton kernels run in the interpreter

    def run(*flags):
        out = subprocess.run([python, "train_vit.py", *flags], cwd=project, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    # The wheel's metadata declares torch and triton only; the extras add the rest.
    metadata = call(python, "-m", "pip", "show", "tritonzoo", capture_output=True, text=True).stdout
    assert "Requires: torch, triton" in metadata and str(venv) in metadata
    plain, served = run(), run("--triton")
    assert served["report"]["served"] == 4 * 2 and served["report"]["fell_back"] == 0
    assert served["losses"] == pytest.approx(plain["losses"], abs=1e-4)
    # The `zoo` command of a kernels-only install says which extra it needs.
    zoo = call(venv / "bin" / "zoo", "fit", "-c", "x.yaml", capture_output=True, text=True, check=False)
    assert zoo.returncode == 1 and 'pip install "tritonzoo[tasks]"' in zoo.stderr
