"""What every stage shares, importing nothing else of the package: the RGB rule for images,
task and calibration metrics, the confidence baselines that plant nothing (temperature
scaling among them), package versions recorded beside results, process lock files, and where
the package's data lies. Reads and writes nothing of a run; imports no torch."""
