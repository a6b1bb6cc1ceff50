"""Where the pipeline means the GPU and the host to overlap, neither waits for the other (CUDA only; skipped
without a GPU, run by bench/gpu_session.sh).

Each test queues about two seconds of spinning on the main stream (torch.cuda._sleep, standing in for a training
step or a teacher forward), calls the code under test, and asserts that the main stream is still busy when the
call returns: the call neither made the host wait for the device nor queued its own work behind the step. Then it
checks the results once everything has run, so the overlap did not cost correctness. The last test checks the
converse: the GPU decode never writes memory that kernels queued on the caller's stream have still to read.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bench.bench_replay import photo_jpegs
from pipeline.cache.builder import ReadBack
from pipeline.replay import block_render, loader
from pipeline.models.teacher import model_input
from pipeline.replay import batched
from pipeline.replay.view_params import AugmentConfig
from pipeline.replay.transfer import cuda_stream

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]  # torchvision 0.29

BUSY_S = 2.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def cycles_per_second() -> float:
    torch.cuda._sleep(10**6)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(10**8)
    torch.cuda.synchronize()
    return 10**8 / (time.perf_counter() - t0)


def _queue_busy_step(cycles_per_second: float) -> None:
    torch.cuda._sleep(int(BUSY_S * cycles_per_second))


def _main_still_busy() -> bool:
    return not torch.cuda.current_stream().query()


class TestCudaStreams:
    def test_batched_render_waits_neither_for_the_step_nor_for_its_own_stream(self, cycles_per_second):
        # render_blocks is what the loader calls for each pool: the render, its per-op numbers and the batch
        # order all go to the device as queued copies. A blocking copy would make the host wait for the side
        # stream's queued work (here a second of sleep) or, on the main stream, for the step.
        items = [(i, data, (7 * i) % 1000) for i, data in enumerate(photo_jpegs((500, 375), 32))]
        plan = batched.plan_block(items, run_seed=0, seed_index=0, cfg=AugmentConfig(image_size=224), num_classes=1000)
        perm = np.random.default_rng(0).permutation(len(items))
        dev = torch.device("cuda")
        want = [block_render.collate_plan(plan, 0, perm)]
        block_render.render_blocks(want, dev, manifest=None)  # warm-up: nvJPEG's handles, the allocator's pools
        torch.cuda.synchronize()
        side = cuda_stream(dev, "render")
        _queue_busy_step(cycles_per_second)
        with torch.cuda.stream(side):
            torch.cuda._sleep(int(0.5 * BUSY_S * cycles_per_second))
        got = [block_render.collate_plan(plan, 0, perm)]
        t0 = time.perf_counter()
        block_render.render_blocks(got, dev, manifest=None)
        seconds = time.perf_counter() - t0
        assert not side.query(), f"the render waited for its own stream ({seconds:.2f} s): a blocking copy"
        assert _main_still_busy(), f"the render waited for the queued step ({seconds:.2f} s)"
        torch.cuda.synchronize()
        assert torch.equal(got[0]["image"], want[0]["image"])
        assert torch.equal(want[0]["image"], batched.render_plan(plan, dev)[torch.from_numpy(perm).to(dev)])

    def test_model_input_does_not_wait_for_the_device(self, cycles_per_second):
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
        model_input(images, MEAN, STD, device="cuda", channels_last=True)  # warm-up: the constants, made once
        torch.cuda.synchronize()
        _queue_busy_step(cycles_per_second)
        got = model_input(images, MEAN, STD, device="cuda", channels_last=True)
        assert _main_still_busy(), "model_input made the host wait for the device"
        want = model_input(images.cpu(), MEAN, STD, device="cpu")
        torch.testing.assert_close(got.cpu(), want)

    def test_teacher_logits_are_read_back_without_waiting(self, cycles_per_second):
        _queue_busy_step(cycles_per_second)
        logits = torch.arange(12, dtype=torch.float32, device="cuda").view(3, 4) * 2  # runs after the busy step
        pending = ReadBack(logits)
        assert _main_still_busy(), "queuing the read-back made the host wait for the device"
        assert pending.numpy().tolist() == [[2.0 * (4 * r + c) for c in range(4)] for r in range(3)]

    def test_gpu_decode_never_writes_memory_a_queued_kernel_still_reads(self, cycles_per_second):
        # pytorch/vision#9606: nvJPEG's outputs were blocks just freed on the caller's stream, overwritten before
        # the kernels queued there had read them. Victims the decoded images' size, freed with their reads queued
        # behind a busy step, are what the allocator would hand the decoder; their sums must come out exact.
        jpegs = photo_jpegs((500, 375), 8)
        codecs = ["jpeg"] * len(jpegs)
        dev = torch.device("cuda")
        want = [image.clone() for image in batched.decode_batch(jpegs, codecs, dev)]  # warm-up and reference
        torch.cuda.synchronize()
        wrong = []
        for trial in range(10):
            victims = [torch.full(tuple(want[0].shape), k + 1, dtype=torch.uint8, device=dev) for k in range(8)]
            torch.cuda.synchronize()
            torch.cuda._sleep(int(0.3 * cycles_per_second))
            sums = [v.sum(dtype=torch.int64) for v in victims]  # queued behind the sleep
            del victims
            got = batched.decode_batch(jpegs, codecs, dev)
            torch.cuda.synchronize()
            wrong += [(trial, k) for k, s in enumerate(sums) if int(s) != (k + 1) * want[0].numel()]
            assert all(torch.equal(g, w) for g, w in zip(got, want)), f"trial {trial}: decoded pixels changed"
        assert not wrong, f"the decode overwrote memory that queued kernels still read (trial, victim): {wrong}"

    def test_a_shuffled_batch_reaches_the_device_without_a_wait(self, cycles_per_second):
        # The DataLoader pins each block, but cutting a batch from the pool makes new tensors: unless they are
        # pinned too, copying the batch's views to the GPU waits for every kernel queued before it (the step).
        g = torch.Generator().manual_seed(0)
        pool = [{"index": torch.arange(16) + 16 * b, "image": torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                                                                           generator=g)} for b in range(2)]
        want = loader._take([dict(b) for b in pool], 24, np.random.default_rng(0))
        got = loader._take([dict(b) for b in pool], 24, np.random.default_rng(0), pin=True)
        assert all(v.is_pinned() and torch.equal(v, want[k]) for k, v in got.items())
        in_order = loader._take([dict(b) for b in pool], 24, None, pin=True)  # stage one's cut: arrival order
        assert all(v.is_pinned() for v in in_order.values()) and torch.equal(in_order["index"], torch.arange(24))
        model_input(got["image"], MEAN, STD, device="cuda")  # warm-up: the constants, made once
        torch.cuda.synchronize()
        _queue_busy_step(cycles_per_second)
        x = model_input(got["image"], MEAN, STD, device="cuda")
        assert _main_still_busy(), "copying a loader batch to the GPU made the host wait for the queued step"
        torch.testing.assert_close(x.cpu(), model_input(want["image"], MEAN, STD, device="cpu"))
