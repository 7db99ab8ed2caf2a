"""3D RoPE: fp16-rounded tables, positions of the condition tokens, rotation properties."""
import numpy as np
import torch

from qavatar.model.rope import apply_rope, framepack_positions, grid_positions, rope_table, video_positions

SPLIT = (22, 21, 21)  # the 14B head_dim 128


def test_table_is_the_fp16_rounding_of_exact_cos_sin():
    pos = grid_positions(range(-40, 400), range(3), range(2))
    table = rope_table(pos, SPLIT)
    assert torch.equal(table.half().float(), table)  # values are fp16
    parts = []
    for axis, n in enumerate(SPLIT):
        inv = 1.0 / np.power(10000.0, np.arange(0, 2 * n, 2) / (2 * n))
        angle = pos[:, axis].numpy().astype(np.float64)[:, None] * inv[None]
        parts.append(np.stack([np.cos(angle), np.sin(angle)], -1))
    exact = torch.from_numpy(np.concatenate(parts, 1)).float()
    assert (table - exact).abs().max() <= 2.0 ** -11  # within one fp16 rounding step


def test_negative_time_is_the_conjugate():
    table = rope_table(torch.tensor([[5, 1, 2], [-5, 1, 2]]), SPLIT)
    assert torch.equal(table[1, :22, 1], -table[0, :22, 1])
    assert torch.equal(table[1, :22, 0], table[0, :22, 0])
    assert torch.equal(table[1, 22:], table[0, 22:])


def test_position_zero_is_identity_and_rotation_keeps_norms():
    x = torch.randn(2, 6, 3, 128)
    assert torch.equal(apply_rope(x, rope_table(torch.zeros(6, 3, dtype=torch.long), SPLIT)), x)
    y = apply_rope(x, rope_table(grid_positions(range(6), [4], [9]), SPLIT))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=2e-3)


def test_attention_scores_depend_on_relative_time_only():
    q, k = torch.randn(1, 1, 1, 128), torch.randn(1, 1, 1, 128)

    def score(tq, tk):
        rq = apply_rope(q, rope_table(torch.tensor([[tq, 2, 3]]), SPLIT))
        rk = apply_rope(k, rope_table(torch.tensor([[tk, 2, 3]]), SPLIT))
        return (rq * rk).sum().item()

    assert abs(score(10, 4) - score(40, 34)) < 2e-2 * abs(score(10, 4)) + 1e-2
    assert abs(score(10, 4) - score(10, 30)) > 1e-3


def test_video_and_framepack_positions():
    pos = video_positions(12, 3, 8, 4)
    assert pos.shape == (96, 3) and pos[0].tolist() == [12, 0, 0] and pos[-1].tolist() == [14, 7, 3]
    assert pos[5].tolist() == [12, 1, 1]  # frame-major, then h, then w
    post, x2, x4 = framepack_positions((1, 2, 16), 16, 8)
    assert post.shape == (32, 3) and set(post[:, 0].tolist()) == {-1}
    assert x2.shape == (8, 3) and set(x2[:, 0].tolist()) == {-3}
    assert sorted(set(x2[:, 1].tolist())) == [0, 2, 4, 7]  # int(linspace(0, H/2-1, H/4)) on the full patch grid
    assert x4.shape == (8, 3) and sorted(set(x4[:, 0].tolist())) == [-19, -14, -9, -4]
    # 704x384: 1056 tokens per frame, FramePack 1056 + 264 + 264 = 1584 motion tokens
    assert sum(len(g) for g in framepack_positions((1, 2, 16), 88, 48)) == 1584
