"""What every stage shares and nothing else of the package: the RGB rule for images, package
versions recorded beside results, process lock files, and where the package's data lies.
Reads and writes nothing of a run."""
