#!/usr/bin/env python3
"""PyTorch reference of edge-inspect's UNet, for comparison only (not used by the product).

1. Rebuilds the UNet of a bundle in PyTorch from its manifest, loads the weights from the
   bundle's ONNX initializers (same parameter paths), and compares the PyTorch forward pass
   with ONNX Runtime's on the same graph: an independent check of the exported semantics.
2. Times a training step (forward + Huber loss + backward + AdamW) at the given batch size,
   on CPU with the given thread count and, if available, on CUDA.
3. With `--loop DATA`, also runs the loop `retrain` runs (random training frames of DATA/train,
   random flips, noising on the bundle's schedule, Huber, per-tensor gradient clipping, AdamW,
   EMA) for `--steps` steps and prints its seconds per step, comparable with the
   `seconds_per_step` of `retrain`'s report.

Usage: python3 scripts/torch_reference.py models/<bundle> [--batch 16] [--threads 2] [--steps 10]
       [--loop data/brick]
Needs torch, onnx, onnxruntime, numpy (and tomllib, Python >= 3.11); `--loop` also Pillow.
"""
import argparse
import math
import time
import tomllib

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnx import numpy_helper


class GroupNorm(torch.nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.groups = groups
        self.gamma = torch.nn.Parameter(torch.ones(channels))
        self.beta = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.gamma, self.beta, eps=1e-5)


class Linear(torch.nn.Module):
    """Weight stored [in, out] as in burn and the ONNX Gemm."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        self.bias = torch.nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def conv(c_in, c_out, k, stride=1):
    return torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)


class ResBlock(torch.nn.Module):
    def __init__(self, c_in, c_out, time_dim, groups):
        super().__init__()
        self.norm1 = GroupNorm(c_in, groups)
        self.conv1 = conv(c_in, c_out, 3)
        self.time_proj = Linear(time_dim, c_out)
        self.norm2 = GroupNorm(c_out, groups)
        self.conv2 = conv(c_out, c_out, 3)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class Attention(torch.nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = GroupNorm(c, groups)
        self.q, self.k, self.v, self.proj = (conv(c, c, 1) for _ in range(4))

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(n, c, h * w).transpose(1, 2)
        k = self.k(y).reshape(n, c, h * w)
        v = self.v(y).reshape(n, c, h * w)
        a = torch.softmax(q @ k / math.sqrt(c), dim=-1)
        return x + self.proj((v @ a.transpose(1, 2)).reshape(n, c, h, w))


class Level(torch.nn.Module):
    def __init__(self, res, resample):
        super().__init__()
        self.res = torch.nn.ModuleList(res)
        self.resample = resample


class UNet(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        base, groups, widths = cfg["base_channels"], cfg["groups"], [m * cfg["base_channels"] for m in cfg["channel_mults"]]
        time_dim, self.base = base * 4, base
        self.time_in, self.time_out = Linear(base, time_dim), Linear(time_dim, time_dim)
        self.conv_in = conv(cfg["channels"], base, 3)
        self.down, skips, ch = torch.nn.ModuleList(), [], base
        for i, w in enumerate(widths):
            res = []
            for _ in range(cfg["res_blocks"]):
                res.append(ResBlock(ch, w, time_dim, groups))
                ch = w
                skips.append(ch)
            self.down.append(Level(res, conv(ch, ch, 3, 2) if i + 1 < len(widths) else None))
        self.mid1 = ResBlock(ch, ch, time_dim, groups)
        self.mid_attn = Attention(ch, groups) if cfg["attention"] else None
        self.mid2 = ResBlock(ch, ch, time_dim, groups)
        self.up = torch.nn.ModuleList()
        for i in reversed(range(len(widths))):
            res = []
            for _ in range(cfg["res_blocks"]):
                res.append(ResBlock(ch + skips.pop(), widths[i], time_dim, groups))
                ch = widths[i]
            self.up.append(Level(res, conv(ch, ch, 3) if i > 0 else None))
        self.norm_out = GroupNorm(ch, groups)
        self.conv_out = conv(ch, cfg["channels"], 3)

    def forward(self, x, t):
        half = self.base // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        args = t[:, None] * freqs[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        emb = F.silu(self.time_out(F.silu(self.time_in(emb))))
        h, skips = self.conv_in(x), []
        for level in self.down:
            for block in level.res:
                h = block(h, emb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for level in self.up:
            for block in level.res:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.resample is not None:
                h = level.resample(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def onnx_name(torch_name):
    """Maps PyTorch parameter names onto the exporter's paths."""
    name = torch_name.replace(".resample.", ".down." if torch_name.startswith("down") else ".up.")
    return name


def load_weights(model, graph):
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = inits[onnx_name(name)].reshape(p.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def time_steps(model, batch, channels, size, steps, device):
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
    times = []
    for i in range(steps + 2):
        x = torch.randn(batch, channels, size, size, device=device)
        e = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,), device=device).float()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.huber_loss(model(x, t), e, delta=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def load_frames(data, size):
    from pathlib import Path

    from PIL import Image

    files = sorted(p for p in Path(data, "train").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    frames = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR), np.float32) for p in files]
    return torch.from_numpy(np.stack(frames) / 127.5 - 1.0).unsqueeze(1)


def time_loop(model, frames, schedule, batch, steps, clip=1.0, ema_decay=0.999):
    """`retrain`'s loop on the CPU: returns (mean, median) seconds per step over all steps."""
    betas = torch.linspace(schedule["beta_start"], schedule["beta_end"], schedule["steps"], dtype=torch.float64)
    alpha_bar = torch.cumprod(1.0 - betas, 0).float()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
    ema = [p.detach().clone() for p in model.parameters()]
    times, started = [], time.perf_counter()
    for step in range(steps):
        start = time.perf_counter()
        x0 = frames[torch.randint(0, len(frames), (batch,))]
        flip = torch.rand(batch, 2) < 0.5
        x0 = torch.where(flip[:, 0, None, None, None], x0.flip(3), x0)
        x0 = torch.where(flip[:, 1, None, None, None], x0.flip(2), x0)
        k = torch.randint(0, len(alpha_bar), (batch,))
        eps = torch.randn_like(x0)
        a = alpha_bar[k][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.huber_loss(model(x_t, k.float()), eps, delta=0.2)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"loss became {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(decay).add_(p, alpha=1 - decay)
        times.append(time.perf_counter() - start)
    times.sort()
    return (time.perf_counter() - started) / steps, times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--loop", metavar="DATA", help="also time retrain's loop on DATA/train's frames")
    args = ap.parse_args()
    manifest = tomllib.load(open(f"{args.bundle}/manifest.toml", "rb"))
    cfg, size = manifest["unet"], manifest["input"]["height"]
    graph = onnx.load(f"{args.bundle}/model.onnx")
    onnx.checker.check_model(graph, full_check=True)
    model = UNet(cfg)
    load_weights(model, graph.graph)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, parameters {sum(p.numel() for p in model.parameters())}")

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, cfg["channels"], size, size)).astype(np.float32)
    t = np.array([0, 99, 500, 999], dtype=np.float32)
    sess = onnxruntime.InferenceSession(f"{args.bundle}/model.onnx", providers=["CPUExecutionProvider"])
    ort_out = sess.run(["eps"], {"x_t": x, "t": t})[0]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    print(f"parity: max |torch - onnxruntime| = {np.abs(torch_out - ort_out).max():.3e} (batch 4, onnx.checker full_check passed)")

    torch.set_num_threads(args.threads)
    ms = time_steps(UNet(cfg), args.batch, cfg["channels"], size, args.steps, "cpu")
    print(f"PyTorch CPU ({args.threads} threads): batch {args.batch}, {size}x{size}: median train step {ms:.0f} ms")
    if args.loop:
        frames = load_frames(args.loop, size)
        mean, median = time_loop(UNet(cfg), frames, manifest["schedule"]["betas"] | {"steps": manifest["schedule"]["steps"]}, args.batch, args.steps)
        print(f"PyTorch CPU loop ({len(frames)} frames of {args.loop}): {args.steps} steps, {mean:.3f} s per step (median {median:.3f})")
    if torch.cuda.is_available():
        ms = time_steps(UNet(cfg), args.batch, cfg["channels"], size, args.steps * 3, "cuda")
        print(f"PyTorch CUDA ({torch.cuda.get_device_name()}): batch {args.batch}: median train step {ms:.1f} ms")
        for batch in (64, 256):
            ms = time_steps(UNet(cfg), batch, cfg["channels"], size, args.steps * 3, "cuda")
            print(f"PyTorch CUDA: batch {batch}: median train step {ms:.1f} ms ({batch * 1e3 / ms:.0f} images/s)")


if __name__ == "__main__":
    main()
