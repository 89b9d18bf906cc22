"""models.host: values read from a device tensor once per tensor."""

import torch

from models.host import ReadOnce


def test_read_once_per_tensor_and_version():
    reads = ReadOnce()
    calls = []
    a = torch.tensor([1, 2, 3])

    def read(t):
        calls.append(1)
        return t.tolist()

    assert reads.get(a, lambda: read(a)) == [1, 2, 3]
    assert reads.get(a, lambda: read(a)) == [1, 2, 3] and len(calls) == 1
    assert reads.get(a, lambda: read(a)[:2], key="two") == [1, 2] and len(calls) == 2  # another key
    a[0] = 7  # in place: its version changed
    assert reads.get(a, lambda: read(a)) == [7, 2, 3] and len(calls) == 3


def test_a_new_tensor_is_read_even_where_a_freed_one_was():
    reads = ReadOnce()
    with torch.inference_mode():  # inference tensors: no version counter, identity only
        for values in ([1, 2], [3, 4], [5, 6]):
            t = torch.tensor(values)  # the allocator may hand it the last one's memory
            assert reads.get(t, t.tolist) == values
            del t


def test_only_the_last_few_are_kept():
    reads = ReadOnce(size=2)
    tensors = [torch.tensor([i]) for i in range(3)]
    for t in tensors:
        reads.get(t, t.tolist)
    calls = []
    reads.get(tensors[0], lambda: calls.append(1) or [0])
    assert calls == [1]  # pushed out by the two after it
