"""Stand-ins for GPU sessions on a CPU machine: a session whose providers differ from the request (what ORT
returns when a provider fails to load), an IOBinding that reads and writes through pointers, and a session
that reports the CUDA provider and computes on the CPU through it."""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
_REAL_SESSION = ort.InferenceSession   # the tests replace ort.InferenceSession with stand-ins


class StandInSession:
    """What ORT returns when a provider fails to load: a session on fewer providers than asked for."""

    created: list = []

    def __init__(self, got):
        self.got = got

    def __call__(self, model, so, providers):
        StandInSession.created.append(providers)
        self.providers = providers
        # a graph file: its declared inputs and outputs come from a CPU session of it
        self.io = _REAL_SESSION(model, providers=["CPUExecutionProvider"]) if isinstance(model, str) else None
        return self

    def get_inputs(self):
        return self.io.get_inputs()

    def get_outputs(self):
        return self.io.get_outputs()

    def get_providers(self):
        return list(self.got)

    def run(self, names, feed):  # the probe graph, y = Relu(x)
        return [np.maximum(feed["x"], 0)]


class PointerBinding:
    """IOBinding stand-in: records the binds, runs a CPU session on the memory behind the pointers, and
    writes the outputs into the bound output buffers (what ORT's CUDA provider does on the device)."""

    def __init__(self, sess):
        self.sess, self.inputs, self.outputs, self.synced = sess, {}, {}, []

    def bind_input(self, name, device_type, device_id, dtype, shape, ptr):
        self.inputs[name] = (device_type, device_id, np.dtype(dtype), tuple(shape), ptr)

    def bind_output(self, name, device_type, device_id, dtype, shape, ptr):
        self.outputs[name] = (device_type, device_id, np.dtype(dtype), tuple(shape), ptr)

    def synchronize_inputs(self):
        self.synced.append("inputs")

    def synchronize_outputs(self):
        self.synced.append("outputs")

    @staticmethod
    def view(dtype, shape, ptr):
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)

    def run(self):
        feed = {k: self.view(dt, sh, p).copy() for k, (_, _, dt, sh, p) in self.inputs.items()}
        res = self.sess.run(list(self.outputs), feed)
        for (name, (_, _, dt, sh, p)), r in zip(self.outputs.items(), res):
            self.view(dt, sh, p)[...] = r


class GpuSessionStandIn:
    """A session that reports the CUDA provider and computes on the CPU through PointerBinding."""

    def __init__(self, path):
        self.cpu = _REAL_SESSION(str(path), providers=["CPUExecutionProvider"])
        self.bindings = []
        self.graph_ids = []   # the gpu_graph_id of each run (None without run options)

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self):
        self.bindings.append(PointerBinding(self.cpu))
        return self.bindings[-1]

    def run_with_iobinding(self, io, run_options=None):
        self.graph_ids.append(None if run_options is None else run_options.get_run_config_entry("gpu_graph_id"))
        io.run()
