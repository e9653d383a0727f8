"""Axial attention against an explicit float64 loop of the Axial-DeepLab formula, and its size limits."""

from __future__ import annotations

import math

import pytest
import torch

from remax.models.axial import AxialAttention1D, AxialAttention2D


def _randomize_bn(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters (used in eval mode)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * 0.2)


def _bn(x: float, bn: torch.nn.Module, c: int) -> float:
    return ((x - bn.running_mean[c].item()) / math.sqrt(bn.running_var[c].item() + bn.eps)
            * bn.weight[c].item() + bn.bias[c].item())


def _oracle_1d(att: AxialAttention1D, x: torch.Tensor) -> torch.Tensor:
    """y_i = Σ_j softmax_j(BN(q_i·k_j) + BN(q_i·r^q_{j-i}) + BN(k_j·r^k_{j-i})) · (v_j ⊕ r^v_{j-i}), with
    the retrieved content and position values batch-normalised separately and summed (Axial-DeepLab)."""
    b, c_in, length = x.shape
    h, dk_total, dv_total = att.num_heads, att.key_depth, att.value_depth
    dk, dv = dk_total // h, dv_total // h
    big = att.query_rpe.max_length - 1
    w = att.qkv.weight[:, :, 0]
    rq, rk, rv = att.query_rpe.rpe, att.key_rpe.rpe, att.value_rpe.rpe
    out = torch.zeros(b, dv_total, length, dtype=torch.float64)
    for n in range(b):
        qkv = [[_bn(sum(w[o, c].item() * x[n, c, l].item() for c in range(c_in)), att.qkv_bn, o)
                for l in range(length)] for o in range(2 * dk_total + dv_total)]

        def q(hd: int, d: int, l: int) -> float:
            return qkv[hd * dk + d][l]

        def k(hd: int, d: int, l: int) -> float:
            return qkv[dk_total + hd * dk + d][l]

        def v(hd: int, d: int, l: int) -> float:
            return qkv[2 * dk_total + hd * dv + d][l]

        for hd in range(h):
            for i in range(length):
                logits = []
                for j in range(length):
                    r = j - i + big
                    content = sum(q(hd, d, i) * k(hd, d, j) for d in range(dk))
                    qpos = sum(q(hd, d, i) * rq[r, d].item() for d in range(dk))
                    kpos = sum(k(hd, d, j) * rk[r, d].item() for d in range(dk))
                    logits.append(_bn(content, att.similarity_bn, hd) + _bn(qpos, att.similarity_bn, h + hd)
                                  + _bn(kpos, att.similarity_bn, 2 * h + hd))
                top = max(logits)
                e = [math.exp(z - top) for z in logits]
                a = [z / sum(e) for z in e]
                for d in range(dv):
                    content = sum(a[j] * v(hd, d, j) for j in range(length))
                    position = sum(a[j] * rv[j - i + big, d].item() for j in range(length))
                    ch = hd * dv + d
                    out[n, ch, i] = (_bn(content, att.output_bn, ch) + _bn(position, att.output_bn, dv_total + ch))
    return out


def test_axial_1d_matches_float64_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    att = AxialAttention1D(in_channels=3, key_depth=4, value_depth=6, num_heads=2, max_length=7).double().eval()
    with torch.no_grad():
        _randomize_bn(att, gen)
        for table in (att.query_rpe.rpe, att.key_rpe.rpe, att.value_rpe.rpe):
            table.copy_(torch.randn(table.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        got = att(x)
    want = _oracle_1d(att, x)
    assert got.shape == (2, 6, 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [1, 2, 6, 9])
def test_axial_1d_any_length_up_to_the_table_limit(length: int) -> None:
    att = AxialAttention1D(in_channels=4, key_depth=4, value_depth=8, num_heads=2, max_length=9).eval()
    y = att(torch.randn(3, 4, length))
    assert y.shape == (3, 8, length) and torch.isfinite(y).all()


def test_axial_1d_rejects_axis_longer_than_the_table() -> None:
    att = AxialAttention1D(in_channels=4, key_depth=4, value_depth=8, num_heads=2, max_length=9)
    assert att.query_rpe.rpe.shape == (2 * 9 - 1, 2)
    with pytest.raises(ValueError, match=r"length 10 exceeds .* limit 9"):
        att(torch.randn(1, 4, 10))


def test_axial_1d_tables_are_indexed_by_key_minus_query() -> None:
    """Entry (i, j) of the expanded table is row ``j - i + max_length - 1`` of the learned table."""
    att = AxialAttention1D(in_channels=2, key_depth=2, value_depth=2, num_heads=1, max_length=4)
    table = att.query_rpe(3)
    for i in range(3):
        for j in range(3):
            assert torch.equal(table[i, j], att.query_rpe.rpe[j - i + 3])


def test_axial_2d_is_height_then_width_attention() -> None:
    """The 2-D block equals the 1-D height attention on every column followed by width attention on every row."""
    torch.manual_seed(0)
    att = AxialAttention2D(in_channels=3, key_depth=4, value_depth=6, num_heads=2, max_length=8).double().eval()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        got = att(x)
        mid = torch.zeros(2, 6, 5, 7, dtype=torch.float64)
        for n in range(2):
            for col in range(7):
                mid[n, :, :, col] = att.height_axis(x[n:n + 1, :, :, col])[0]
        want = torch.zeros_like(mid)
        for n in range(2):
            for row in range(5):
                want[n, :, row, :] = att.width_axis(mid[n:n + 1, :, row, :])[0]
    assert got.shape == (2, 6, 5, 7)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_axial_softmax_runs_in_fp32_under_autocast() -> None:
    """Under bf16 autocast the attention weights still sum to one in fp32 precision (output stays finite)."""
    torch.manual_seed(0)
    att = AxialAttention1D(in_channels=4, key_depth=4, value_depth=8, num_heads=2, max_length=16).eval()
    x = torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = att(x)
    ref = att(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
