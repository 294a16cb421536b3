"""Side-by-side benchmark of fl_ondevice against a Flower + Keras peer (issue 7)."""
