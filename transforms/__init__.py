"""The job's Beam steps, over a Beam-free foundation.

Two layers, visible in the layout: the modules here are Beam transforms and DoFns (read, duplicates,
skip_explained, explain, summary, parquet_sink); io/ (storage, readers, records, rows, publication,
history, progress) and model/ (loading, endpoints, ONNX, threads, the explain handler) never import
Beam, so the launcher's checks and the reports use them without it.
"""
