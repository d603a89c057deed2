"""Using a trained head: the model directory, calibration, the out-of-distribution check, predict."""
