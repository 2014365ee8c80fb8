"""Model-independent evaluation for the Decom-CAM quality benchmarks.

``protocol``       pointing game, RISE deletion/insertion curves, the paper's accuracy-binned protocol, plots.
``voc``            readers for a PASCAL-VOC-layout folder and an ImageFolder (Mini-ImageNet) layout.
``synthetic_data`` a deterministic generator of labelled, boxed images for offline tests and benchmarks.
``evaluate``       the two evaluations over an exported model on ONNX Runtime (methods, baselines, caching).
``report``         the paper's Table 1 / Table 2 formats as text.
``train``          a small CLIP ResNet trained on the synthetic data (cached), exported with export_model.
``synthetic``      the whole protocol offline; ``python -m benchmarks.quality`` is the command line.
``pairs``          paired differences between methods of earlier runs, with bootstrap intervals.
"""
