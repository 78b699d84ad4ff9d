import numpy as np
import pytest
import torch

from llmslim.pack import pack, packed_len, unpack


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py), verbatim logic."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_autogptq_layout(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (96, 7), generator=g)
    ours = pack(values, bits, dim=0)
    ref = autogptq_pack(values.numpy(), bits)
    assert ours.dtype == torch.int32
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 1), (64, 3), (96, 33), (256, 5)])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip(bits, shape, dim):
    shape = shape if dim == 0 else shape[::-1]
    g = torch.Generator().manual_seed(sum(shape) + bits)
    values = torch.randint(0, 2**bits, shape, generator=g)
    packed = pack(values, bits, dim)
    assert packed.shape[dim] == shape[dim] * bits // 32
    assert torch.equal(unpack(packed, bits, dim), values.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exhaustive_values_every_position(bits):
    # every value at every position of a run (the 3-bit straddling slots included)
    n = 32
    vals = torch.arange(2**bits).repeat_interleave(n).reshape(2**bits, n).T  # [32, 2**bits]
    assert torch.equal(unpack(pack(vals, bits, 0), bits, 0), vals.to(torch.int32))


def test_packed_len_rejects_odd_sizes():
    assert packed_len(576, 4) == 72
    assert packed_len(64, 3) == 6
    with pytest.raises(ValueError):
        packed_len(48, 3)
    with pytest.raises(ValueError):
        packed_len(12, 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_and_unpack_stay_on_the_inputs_device(bits):
    """Every temporary follows its input, so a layer held on an accelerator decodes there: on the meta
    device, a temporary made on the CPU fails the operation."""
    values = torch.randint(0, 2**bits, (64, 8), dtype=torch.int32)
    packed = pack(values.to("meta"), bits, dim=0)
    assert packed.device.type == "meta" and packed.shape == pack(values, bits, dim=0).shape
    out = unpack(packed, bits, dim=0)
    assert out.device.type == "meta" and out.shape == values.shape
