"""Deployment: ONNX export (``export``) and TensorRT 2:4 eligibility of an ONNX file
(``onnx_check``), the dense-vs-sparse throughput audit (``audit``), MAC accounting (``macs``) and
token merging (``tome``)."""
