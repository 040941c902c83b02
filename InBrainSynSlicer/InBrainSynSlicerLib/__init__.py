"""Plain-Python half of the InBrainSyn Slicer module: everything that can run without the desktop.

* ``manifest``      read an engine run's manifest.json and volumes.csv
* ``engine``        command lines, JSON event stream, background process with cancel, age checks
* ``input_volume``  is this node a usable 3D T1? write it to a file without modifying it
* ``scene``         add one run's results to an MRML scene, all or nothing
* ``layout``        the side-by-side layout (baseline | synthetic at the browser's age + Jacobian)
* ``snapshot``      render a slice view offscreen through Slicer's slice pipeline
* ``headless``      a scene with the module logics, for tests and scripts outside Slicer
* ``dependencies``  where the engine source ships, what is missing

Only ``manifest`` and ``engine`` avoid MRML; the others need ``import slicer`` (the desktop's, or
PyPI ``slicer-core``).
"""
