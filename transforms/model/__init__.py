"""The Beam-free foundation of the job's model: loading (TorchScript, torch.export, module:Callable,
ONNX, endpoints), threads per worker, and the explain step's handler."""
