"""Model-independent evaluation for the Decom-CAM quality benchmarks.

``protocol``       pointing game, RISE deletion/insertion curves, the paper's accuracy-binned protocol, plots.
``voc``            readers for a PASCAL-VOC-layout folder and an ImageFolder (Mini-ImageNet) layout.
``synthetic_data`` a deterministic generator of labelled, boxed images for offline tests and benchmarks.
"""
