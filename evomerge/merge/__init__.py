"""The merge engine: operators, layer flows, in-place materialisation and streaming export."""
