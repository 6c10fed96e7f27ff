"""Thin DVC/Prefect entry points: read params, call facedetail, write outputs. One module per stage."""
