"""The forward engine for extract and predict, one per device, each held to torch fp32's features on the CPU
(min cosine >= 0.9999 on a parity batch) so that the device is not part of the store fingerprint: a store
extended on a GPU box and on a laptop holds one kind of feature.

  CPU:  the frozen backbone exported once to ONNX and run by onnxruntime (1.36x torch channels_last +
        jit.freeze on Lite0 here, benchmarks/extract_throughput.py), cached per backbone fingerprint; torch
        (channels_last + jit.freeze) when onnxruntime or onnxscript is missing, or export or parity fails.
  CUDA: channels_last in fp32 with TF32 off (bf16 autocast gave min cosine 0.9976 to the CPU's features on
        the shared emoji, issue #22), captured as a CUDA graph (eager where capture fails); refused in one line
        if it still misses parity.

    model = forward_engine(backbone, device, batch_size, engine="auto")   # model(x uint8 (B, C, S, S)) -> (B, D)
    model = cached_engine(store_fingerprint)   # the CPU export, without building the network (or None)
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from features.storage.atomic import atomic_file
from features.models.backbones import Backbone
from features.errors import UserError
from features.input.images import sha256_file

PARITY_MIN_COS = 0.9999
ENGINES = ("auto", "onnx", "torch")


def cache_dir() -> Path:
    """$IMGSENT_CACHE, else $XDG_CACHE_HOME/imgsent, else ~/.cache/imgsent; exports go in its onnx/ folder."""
    base = os.environ.get("IMGSENT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgsent"
    return Path(base) / "onnx"


class OrtEmbedder:
    """onnxruntime session with the torch module's call surface: uint8 (B, C, S, S) -> float32 (B, D)."""

    engine = "onnxruntime"
    layout = torch.contiguous_format  # onnxruntime reads NCHW

    def __init__(self, session, path: Path):
        self.session, self.path = session, path
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.contiguous().cpu().numpy()})[0])


def _export(backbone: Backbone, dst: Path) -> None:
    from torch.export import Dim
    c = backbone.pre.channels
    example = torch.zeros(2, c, backbone.pre.size, backbone.pre.size, dtype=torch.uint8)
    with atomic_file(dst) as tmp, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx narrates every step
        torch.onnx.export(backbone.embedder.cpu().eval(), (example,), str(tmp), dynamo=True, input_names=["pixels"],
                          output_names=["features"], external_data=False, dynamic_shapes=({0: Dim("batch")},))


def _session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # no busy-waiting between runs: spinning intra-op threads would take the cores from the decode workers
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _parity_batch(backbone: Backbone) -> torch.Tensor:
    """4 fixed pseudo-random images (4, C, S, S) uint8."""
    c = backbone.pre.channels
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, c, backbone.pre.size, backbone.pre.size), dtype=torch.uint8, generator=g)


def _parity(backbone: Backbone, model, device: str = "cpu") -> float:
    """Min cosine between torch fp32 features on the CPU and `model`'s on `device`, on the parity batch."""
    x = _parity_batch(backbone)
    reference = backbone.embedder if device == "cpu" else copy.deepcopy(backbone.embedder).cpu()
    with torch.inference_mode():
        ref = reference(x).float()
        got = model(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
    return float(torch.nn.functional.cosine_similarity(ref, got, dim=1).min())


def _ieee_fp32_on_cuda() -> None:
    """fp32 convolutions and matmuls in full fp32: cuDNN's default TF32 rounds inputs to 10 mantissa bits."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class GraphedForward:
    """The model's forward captured once as a CUDA graph for `batch` images: a batch is then one replay, one
    call that releases the GIL, instead of ~200 kernel launches from Python. Each launch re-takes the GIL from
    the decode threads, and on an H200 with 14 of them that convoy held eager extraction to 159 img/s while the
    GPU alone does 9,600 (BENCHMARKS.md). Smaller batches fill the front of the static input; larger ones go
    through in chunks."""

    engine = "torch-cuda-graph"

    def __init__(self, model: torch.nn.Module, example: torch.Tensor):
        with torch.inference_mode():
            self.input = example.clone().contiguous(memory_format=torch.channels_last)  # (B, C, S, S) uint8
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # cuDNN chooses its algorithms here, outside the capture
                    model(self.input)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = model(self.input)  # (B, D), rewritten by every replay

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(b, C, S, S) uint8 on the GPU -> (b, D) float32."""
        parts = []
        with torch.inference_mode():
            for chunk in x.split(len(self.input)):
                self.input[:len(chunk)].copy_(chunk)
                self.graph.replay()
                parts.append(self.output[:len(chunk)].clone())
        return torch.cat(parts)


def cuda_model(backbone: Backbone, batch_size: int):
    """fp32 channels_last on the GPU as a CUDA graph (eager where capture fails), parity-checked against the
    CPU. No TorchScript: its profiling executor re-specialises per batch shape, which made `predict` on CUDA
    slower to start than on CPU."""
    _ieee_fp32_on_cuda()
    eager = backbone.embedder.to("cuda").to(memory_format=torch.channels_last)
    c = backbone.pre.channels
    try:
        model = GraphedForward(eager, torch.zeros(batch_size, c, backbone.pre.size, backbone.pre.size,
                                                  dtype=torch.uint8, device="cuda"))
    except Exception:  # noqa: BLE001 - an architecture that cannot be captured runs eagerly (slower, same numbers)
        model = eager
    cos = _parity(backbone, model, "cuda")
    if cos < PARITY_MIN_COS:
        raise UserError(f"--device cuda: {backbone.name} computes other features on this GPU than on the CPU "
                        f"(min cosine {cos:.5f} < {PARITY_MIN_COS}); use --device cpu, or report the GPU and driver")
    return model


def _cache_path(fingerprint: dict, ort_version: str) -> Path:
    key = hashlib.sha256(json.dumps([fingerprint, torch.__version__, ort_version], sort_keys=True).encode())
    return cache_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', fingerprint['backbone'])}-{key.hexdigest()[:20]}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path) -> bool:
    try:
        return _sidecar(path).read_text().strip() == sha256_file(str(path))
    except OSError:
        return False


def cached_engine(fingerprint: dict) -> OrtEmbedder | None:
    """The onnxruntime engine for a store's fingerprint straight from the cache, without building the network
    (2-3 s of imports and weights): only a file that passed the parity check when it was exported (its sha256
    recorded beside it, checked now). None when there is no such file."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = _cache_path(fingerprint, ort.__version__)
    if not path.is_file() or not _verified(path):
        return None
    try:
        return OrtEmbedder(_session(path), path)
    except Exception:  # noqa: BLE001 - unloadable: the caller builds the network and exports afresh
        return None


def onnx_embedder(backbone: Backbone) -> OrtEmbedder | None:
    """The cached onnxruntime engine for `backbone`, or None where it cannot be had (missing packages, export
    failure, parity below PARITY_MIN_COS)."""
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
    except ImportError:
        return None
    path = _cache_path(backbone.fingerprint, ort.__version__)
    for attempt in (0, 1):  # a cached file that fails to load or to match is exported again, once
        try:
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                if sys.stderr.isatty():  # a one-off minute a person at a terminal should not wonder about
                    print(f"{backbone.name}: exporting to ONNX for onnxruntime, once per backbone (up to a minute; "
                          f"cached in {path.parent})", file=sys.stderr, flush=True)
                _export(backbone, path)
            model = OrtEmbedder(_session(path), path)
            if _parity(backbone, model) >= PARITY_MIN_COS:
                if not _verified(path):  # record that this very file passed parity: cached_engine trusts it
                    with atomic_file(_sidecar(path)) as tmp:
                        tmp.write_text(sha256_file(str(path)))
                return model
        except (UserError, OSError):  # an unwritable cache folder, a full disk
            return None
        except Exception:  # noqa: BLE001 - an export or runtime failure: try afresh, then fall back to torch
            pass
        with contextlib.suppress(OSError):
            path.unlink()
    return None


def torch_model(backbone: Backbone, device: str, batch_size: int) -> torch.nn.Module:
    """channels_last + TorchScript freeze (folds BatchNorm into convs): ~2x eager NCHW on CPU.
    Falls back to the eager model for architectures that do not trace."""
    model = backbone.embedder.to(device).to(memory_format=torch.channels_last)
    c = backbone.pre.channels
    example = torch.zeros(batch_size, c, backbone.pre.size, backbone.pre.size, dtype=torch.uint8, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit is deprecated (FutureWarning) but still the fastest torch CPU path
            traced = torch.jit.freeze(torch.jit.trace(model, example.contiguous(memory_format=torch.channels_last),
                                                      check_trace=False))
            traced(example)  # let the profiling executor specialise once
        return traced
    except Exception:  # noqa: BLE001 - tracing is an optimisation only
        return model


def forward_engine(backbone: Backbone, device: str, batch_size: int, engine: str = "auto"):
    """The fastest engine that gives torch fp32's features: `auto` = onnxruntime on CPU when it passes parity,
    else torch; `onnx` refuses to fall back silently; `torch` never tries onnxruntime."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine != "torch" and device == "cpu":
        model = onnx_embedder(backbone)
        if model is not None:
            return model
        if engine == "onnx":
            raise UserError(f"--engine onnx: onnxruntime cannot run {backbone.name} with torch's features here "
                            "(missing onnxruntime/onnxscript, export failed, or parity < 0.9999); use --engine auto")
    elif engine == "onnx":
        raise UserError("--engine onnx runs on CPU only; use --device cpu or --engine auto")
    if device == "cuda":
        return cuda_model(backbone, batch_size)
    return torch_model(backbone, device, batch_size)


def input_layout(model) -> torch.memory_format:
    """The memory layout a forward engine reads its uint8 batch in: channels_last for torch, NCHW for onnxruntime."""
    return getattr(model, "layout", torch.channels_last)
