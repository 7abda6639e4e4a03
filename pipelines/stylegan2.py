"""StyleGAN2 (Karras et al., CVPR 2020) in plain PyTorch: no custom CUDA ops, runs on CPU.

Module and parameter names follow the layout of rosinality's `stylegan2-pytorch` checkpoints, the
format Adapt-then-Unlearn and StyleGAN-NADA use, so their `.pt` files load as state dicts; NVIDIA
checkpoints are renamed into it (pipelines/gan_checkpoints.py). Equalized learning rate: weights are
stored at unit scale and multiplied by their He constant at run time.

Shapes: z and w are [N, style_dim]; W+ codes are [N, n_latent, style_dim]; images [N, 3, S, S]
in about [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BLUR = (1, 3, 3, 1)


def default_channels(size: int, channel_multiplier: int = 2) -> dict[int, int]:
    """StyleGAN2's channels per resolution (config-f for channel_multiplier=2)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return {r: c if r <= 32 else c * channel_multiplier for r, c in table.items() if r <= size}


@dataclass
class StyleGAN2Config:
    size: int = 256
    style_dim: int = 512
    n_mlp: int = 8
    channels: dict[int, int] = field(default_factory=dict)  # resolution -> channels; empty: StyleGAN2's
    lr_mlp: float = 0.01
    channel_multiplier: int = 2

    def __post_init__(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 8, not {self.size}")
        self.channels = {int(k): int(v) for k, v in self.channels.items()} or default_channels(
            self.size, self.channel_multiplier
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = {str(k): v for k, v in self.channels.items()}
        return d


def _kernel(k=BLUR) -> torch.Tensor:
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter, downsample: StyleGAN's resampling, in plain ops."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, (0, 1)).to(x.dtype)[None, None].repeat(c, 1, 1, 1)
    x = F.conv2d(x, weight, groups=c)
    return x[:, :, ::down, ::down] if down > 1 else x


class Blur(nn.Module):
    def __init__(self, pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", _kernel() * upsample_factor**2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", _kernel() * factor**2)
        p = len(BLUR) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale)
        if self.activate:
            return F.leaky_relu(out + self.bias * self.lr_mul, 0.2) * math.sqrt(2)
        return out + self.bias * self.lr_mul


class EqualConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.scale = 1 / math.sqrt(cin * kernel**2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class BiasedLeakyReLU(nn.Module):
    """leaky_relu(x + b, 0.2) * sqrt(2); named `activate` in checkpoints (rosinality's FusedLeakyReLU)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, *([1] * (x.ndim - 2))), 0.2) * math.sqrt(2)


class ModulatedConv2d(nn.Module):
    """Convolution whose weights are scaled per sample by the style (and demodulated)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, style_dim: int, demodulate: bool = True, upsample: bool = False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1)
        self.scale = 1 / math.sqrt(cin * kernel**2)
        self.cin, self.cout, self.kernel = cin, cout, kernel
        self.demodulate, self.upsample = demodulate, upsample
        if upsample:
            p = (len(BLUR) - 2) - (kernel - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        # Modulating the input activations and demodulating the outputs equals convolving each
        # sample with its own modulated kernel, and is one ordinary (fast on CPU) convolution.
        s = self.modulation(style)  # [N, in]
        weight = self.scale * self.weight[0]  # [out, in, k, k]
        x = x * s[:, :, None, None]
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), padding=0, stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.kernel // 2)
        if self.demodulate:  # |w * s|^2 summed over (in, k, k) = s^2 @ (sum_kk w^2)^T
            demod = torch.rsqrt(s.pow(2) @ weight.pow(2).sum([2, 3]).T + 1e-8)  # [N, out]
            out = out * demod[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, *x.shape[-2:]).normal_()
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, kernel, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = BiasedLeakyReLU(cout)

    def forward(self, x, style, noise=None):
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(self, cin: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        return out + self.upsample(skip) if skip is not None else out


class Generator(nn.Module):
    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        ch, d = config.channels, config.style_dim
        self.style = nn.Sequential(
            PixelNorm(), *[EqualLinear(d, d, lr_mul=config.lr_mlp, activate=True) for _ in range(config.n_mlp)]
        )
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, d)
        self.to_rgb1 = ToRGB(ch[4], d, upsample=False)
        self.log_size = int(math.log2(config.size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        cin = ch[4]
        for i in range(3, self.log_size + 1):
            cout = ch[2**i]
            self.convs.append(StyledConv(cin, cout, 3, d, upsample=True))
            self.convs.append(StyledConv(cout, cout, 3, d))
            self.to_rgbs.append(ToRGB(cout, d))
            cin = cout

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> w [N, D]."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, seed: int = 0) -> torch.Tensor:
        z = torch.randn(n, self.config.style_dim, generator=torch.Generator().manual_seed(seed)).to(
            self.input.input.device
        )
        return self.mapping(z).mean(0, keepdim=True)

    def synthesis(self, w: torch.Tensor, noise: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """w [N, D] or W+ [N, n_latent, D] -> images [N, 3, S, S]."""
        if w.ndim == 2:
            w = w[:, None].expand(-1, self.n_latent, -1)
        noise = noise or [None] * self.num_layers
        x = self.conv1(self.input(w.shape[0]), w[:, 0], noise[0])
        skip = self.to_rgb1(x, w[:, 1])
        i = 1
        for conv_up, conv, rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs):
            x = conv_up(x, w[:, i], noise[i])
            x = conv(x, w[:, i + 1], noise[i + 1])
            skip = rgb(x, w[:, i + 2], skip)
            i += 2
        return skip

    def fixed_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def forward(
        self,
        z: torch.Tensor,
        truncation: float = 1.0,
        truncation_latent: torch.Tensor | None = None,
        randomize_noise: bool = True,
        noise: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images for latents `z`: with per-layer noise drawn afresh (`randomize_noise`), the fixed noise,
        or the given `noise` maps ([N, 1, R, R] per layer, as `fixed_noise()` has them)."""
        w = self.mapping(z)
        if truncation < 1 and truncation_latent is not None:
            w = truncation_latent + truncation * (w - truncation_latent)
        if noise is None and not randomize_noise:
            noise = self.fixed_noise()
        return self.synthesis(w, noise)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


class ConvLayer(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, kernel: int, downsample: bool = False, bias: bool = True, activate: bool = True
    ):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR) - 2) + (kernel - 1)
            layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(
            EqualConv2d(
                cin,
                cout,
                kernel,
                stride=2 if downsample else 1,
                padding=0 if downsample else kernel // 2,
                bias=bias and not activate,
            )  # fmt: skip
        )
        if activate:
            layers.append(BiasedLeakyReLU(cout))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = ConvLayer(cin, cin, 3)
        self.conv2 = ConvLayer(cin, cout, 3, downsample=True)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, activate=False, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


def minibatch_stddev_group(samples: int, group: int) -> int:
    """How many images the minibatch-stddev layer of a discriminator of `group` groups together in a batch of
    `samples`: at most `group`, and 1 (no grouping) when that does not divide the batch. Sample j is grouped with
    j + m, j + 2m, ... (m = samples / that size)."""
    size = max(1, min(samples, group))
    return size if samples % size == 0 else 1


class Discriminator(nn.Module):
    """Residual discriminator with the minibatch-standard-deviation layer."""

    def __init__(self, config: StyleGAN2Config, stddev_group: int = 4):
        super().__init__()
        ch = config.channels
        log_size = int(math.log2(config.size))
        blocks: list[nn.Module] = [ConvLayer(3, ch[config.size], 1)]
        cin = ch[config.size]
        for i in range(log_size, 2, -1):
            blocks.append(ResBlock(cin, ch[2 ** (i - 1)]))
            cin = ch[2 ** (i - 1)]
        self.convs = nn.Sequential(*blocks)
        self.stddev_group = stddev_group
        self.final_conv = ConvLayer(cin + 1, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 16, ch[4], activate=True), EqualLinear(ch[4], 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.convs(images)
        n, c, h, w = out.shape
        group = minibatch_stddev_group(n, self.stddev_group)
        stddev = out.view(group, -1, 1, c, h, w)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8).mean([2, 3, 4], keepdim=True).squeeze(2)
        out = torch.cat([out, stddev.repeat(group, 1, h, w)], 1)
        out = self.final_conv(out)
        return self.final_linear(out.view(n, -1))
