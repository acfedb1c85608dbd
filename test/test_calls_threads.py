"""KFAC's interception of ``F.linear`` is per thread and leaves the module functions as found."""

import threading

import torch
import torch.nn.functional as F
from torch import nn

from curvlinops import KFACLinearOperator

DT = torch.float64


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0]).flatten(0, 1)


def problem(seed):
    torch.manual_seed(seed)
    model = Attention().to(DT)
    X = torch.randn(3, 5, 4, dtype=DT)
    y = torch.randint(0, 3, (15,))
    # params are listed here, not in the threads: while a product runs over a model, its
    # modules hold substituted tensors (see docs/checks.rst, "Threads")
    return model, [(X, y)], list(model.parameters())


def dense_kfac(model, data, params):
    K = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, data, fisher_type="type-2")
    return K @ torch.eye(K.shape[1], dtype=DT)


def test_module_functions_restored_after_kfac():
    linear, embedding = F.linear, F.embedding
    fastpath = torch.backends.mha.get_fastpath_enabled()
    dense_kfac(*problem(0))
    assert F.linear is linear and F.embedding is embedding
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_kfac_passes_in_several_threads_do_not_see_each_other():
    """Before, each pass swapped F.linear process-wide: overlapping passes could restore each
    other's patch and leave F.linear replaced for good."""
    linear = F.linear
    problems = [problem(seed) for seed in range(3)]
    expected = [dense_kfac(*p) for p in problems]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(4):
                results[i] = dense_kfac(*problems[i % 3])
        except Exception as error:  # reported below, a failed thread must fail the test
            errors.append(error)

    # a thread that only runs plain F.linear calls meanwhile must get plain results
    def plain(out):
        A, x = torch.randn(4, 4, dtype=DT), torch.randn(7, 4, dtype=DT)
        for _ in range(200):
            out.append(torch.equal(F.linear(x, A), x @ A.T))

    plain_results = []
    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    threads.append(threading.Thread(target=plain, args=(plain_results,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    for i in range(6):
        torch.testing.assert_close(results[i], expected[i % 3], rtol=1e-10, atol=1e-12)
    assert all(plain_results) and len(plain_results) == 200
    assert F.linear is linear
