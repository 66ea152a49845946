"""backends/cuda/model.py on the CPU: the load-time rewrite that folds the predictor's first layer into a decode
step's o_proj GEMV."""
from __future__ import annotations

import torch
from tscompile.backends.cuda.model import fold_predictor


def test_folded_rows_give_the_predictor_hidden_layer():
    """rows_att att + rows_in x_in = fc1 (w_post x) for x = x_in + W_o att: what predict_active divides by rms(x)
    to get fc1 rmsnorm(x), the predictor's hidden layer; in bf16 off by the rounding of the rows only."""
    g = torch.Generator().manual_seed(3)
    hidden, heads_dim, rank = 96, 64, 16
    fc1 = torch.randn(rank, hidden, generator=g) / hidden ** 0.5
    w_post = 0.5 + torch.rand(hidden, generator=g)
    w_o = torch.randn(hidden, heads_dim, generator=g) / heads_dim ** 0.5
    x_in, att = torch.randn(hidden, generator=g), torch.randn(heads_dim, generator=g)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        f, w, o = fc1.to(dtype), w_post.to(dtype), w_o.to(dtype)
        rows_att, rows_in = fold_predictor(f, w, o)
        assert rows_att.shape == (rank, heads_dim) and rows_in.shape == (rank, hidden)
        assert rows_att.dtype == rows_in.dtype == dtype
        got = rows_att.double() @ att.double() + rows_in.double() @ x_in.double()
        want = f.double() @ (w.double() * (x_in.double() + o.double() @ att.double()))
        assert float((got - want).norm() / want.norm()) < tol, dtype
