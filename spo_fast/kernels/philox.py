"""Triton's counter-based Philox random numbers in plain PyTorch, and the RNG state the ops read from device memory.

``tl.randn(seed, offset)`` / ``tl.rand(seed, offset)`` (triton/language/random.py: Philox4x32 with 10 rounds,
the 64-bit seed split into the two 32-bit key words, the 64-bit counter into the first two counter words) are
reproduced here with int64 tensor arithmetic, so the torch backend of an op draws the SAME numbers as its Triton
kernel for one (seed, offset): bit for bit up to the uniform, and up to the last float rounding of log/cos/sqrt
in the Box-Muller transform for normals (libdevice on a GPU, the CPU's libm here; a few ulp).

Everything is tensor arithmetic on the device, with seed and offset given as tensors: no host read, no
``torch.Generator``, shapes fixed by the draw count. That is what makes a rollout capturable as a CUDA graph and
compilable with ``torch.compile(fullgraph=True)``.

**RNG state.** The ops take either Python ints ``(seed, offset)`` or one int64 tensor ``state`` of shape (2,) =
[seed, offset] on the tensors' device (``rng_state``). A state is read on the device by the kernels (and by the
torch path) and advanced in place by the number of draws after each op (``state[1] += n``, a device op), like
a ``torch.Generator``: a sampler makes one state per rollout and passes it to every op, and its draws never
reuse a counter. Limits: 0 <= seed < 2^63, offset + draws < 2^63 (checked for ints; for a state this would be a
host read, so it is not checked: 2^63 draws are never reached).
"""
from __future__ import annotations

import math

import torch

from ._dispatch import check_rng

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # triton's uint_to_uniform_float for 32-bit draws
_TWO_PI = 6.283185307179586


def rng_state(seed: int | torch.Tensor, device=None) -> torch.Tensor:
    """A (2,) int64 state [seed, 0] on ``device``; ``seed`` an int or a 1-element int tensor (kept on its
    device: no host read)."""
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(1).to(device=device if device is not None else seed.device, dtype=torch.int64)
        return torch.cat([s, torch.zeros_like(s)])
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def state_from_generator(generator: torch.Generator | None, device) -> torch.Tensor:
    """A state whose seed is drawn from ``generator`` on ``device`` (no host read): a sampler that makes its state
    this way stays a pure function of the generator's state."""
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=device)
    return rng_state(seed)


def _philox(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two 32-bit outputs (as int64 in [0, 2^32)) of Philox4x32-10 at 64-bit counters ``counter``
    (int64 >= 0) under the 64-bit key ``seed`` (0-d int64): triton's ``randint4x(seed, offset)``'s i1, i2.

    The 32 x 32 -> 64-bit products are int64 multiplications: a product of two values below 2^32 can pass 2^63,
    and the multiplication then wraps (two's complement, as torch's integer kernels do on every backend), which
    keeps exactly the unsigned product's 64 bits: the low word is ``p & M``, the high word ``(p >> 32) & M`` (the
    mask undoes the arithmetic shift's sign fill). tests/test_philox.py checks the stream bit for bit against
    Triton's. Eight tensor ops per round (the first round's zero words skipped)."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    # round 1: c2 = c3 = 0, so B * c2 = 0
    p_a = c0 * _ROUND_A
    c0, c2, c1, c3 = c1 ^ k0, ((p_a >> 32) & _M32) ^ k1, torch.zeros_like(c0), p_a & _M32
    for _ in range(_N_ROUNDS - 1):
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
        p_b, p_a = c2 * _ROUND_B, c0 * _ROUND_A
        c0, c2, c1, c3 = ((p_b >> 32) & _M32) ^ c1 ^ k0, ((p_a >> 32) & _M32) ^ c3 ^ k1, p_b & _M32, p_a & _M32
    return c0, c1


def _to_uniform(x: torch.Tensor) -> torch.Tensor:
    """triton's uint_to_uniform_float for 32-bit draws: the int32 reinterpretation folded to [0, 2^31), times
    (2^23 - 1) / 2^23 * 2^-31, in fp32: uniform in [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # the int32 bit pattern
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * _UNIFORM_SCALE


def _seed_offset(seed, offset, device) -> tuple[torch.Tensor, torch.Tensor]:
    s = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64, device=device)
    o = offset if isinstance(offset, torch.Tensor) else torch.tensor(offset, dtype=torch.int64, device=device)
    return s.reshape(()), o.reshape(())


def philox_uniform_torch(seed, offset, shape, device=None) -> torch.Tensor:
    """fp32 ``tl.rand(seed, offset + i)`` at flat index i of ``shape``; seed and offset ints or 0-d int64 tensors
    (then on their device, read there)."""
    if isinstance(seed, torch.Tensor):
        device = seed.device
    s, o = _seed_offset(seed, offset, device)
    n = math.prod(shape)
    i1, _ = _philox(s, o + torch.arange(n, dtype=torch.int64, device=s.device))
    return _to_uniform(i1).view(shape)


def philox_normal_torch(seed, offset, shape, device=None) -> torch.Tensor:
    """fp32 ``tl.randn(seed, offset + i)`` at flat index i of ``shape`` (Box-Muller on the first two outputs, as
    triton's ``randn``); seed and offset as for ``philox_uniform_torch``."""
    if isinstance(seed, torch.Tensor):
        device = seed.device
    s, o = _seed_offset(seed, offset, device)
    n = math.prod(shape)
    i1, i2 = _philox(s, o + torch.arange(n, dtype=torch.int64, device=s.device))
    u1, u2 = _to_uniform(i1).clamp(min=1.0e-7), _to_uniform(i2)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return (r * torch.cos(u2 * _TWO_PI)).view(shape)


def resolve_state(seed: int | torch.Tensor, offset: int, n_draws: int,
                  like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(state, advance) for an op drawing ``n_draws`` numbers on ``like``'s device: the caller's RNG state tensor
    (checked; the op advances it in place) or a temporary one made from the ints (checked ranges; not advanced)."""
    if isinstance(seed, torch.Tensor):
        check_state(seed, like)
        if offset:
            raise ValueError(f"offset is {offset} with an RNG state tensor; the state carries its own offset")
        return seed, True
    check_rng(seed, offset, n_draws)
    return torch.tensor([seed, offset], dtype=torch.int64, device=like.device), False


def check_state(state: torch.Tensor, like: torch.Tensor) -> None:
    """A state is a (2,) int64 tensor on ``like``'s device."""
    if state.shape != (2,) or state.dtype != torch.int64 or state.device != like.device:
        raise ValueError(f"RNG state is {tuple(state.shape)} {state.dtype} on {state.device}; expected a (2,) int64 "
                         f"tensor [seed, offset] on {like.device} (spo_fast.kernels.philox.rng_state)")
