"""Plain-Python half of the InBrainSyn Slicer module: everything that can run without the desktop.

* ``manifest``      read an engine run's manifest.json and volumes.csv
* ``engine``        command lines, JSON event stream, background process with cancel, age checks
* ``input_volume``  is this node a usable 3D T1? write it to a file without modifying it
* ``scene``         add one run's results to an MRML scene, all or nothing
* ``layout``        the side-by-side layout (baseline | synthetic at the browser's age + Jacobian)
* ``snapshot``      render a slice view offscreen through Slicer's slice pipeline
* ``runner``        one run at a time, with the settings captured when it started
* ``headless``      a scene with the module logics, for tests and scripts outside Slicer
* ``dependencies``  where the engine source ships, what is missing, installing it in the background
* ``slicer_versions`` the supported Slicer releases and what their Python bundles
* ``selftest``      the self-test's input (the demo subject at 3 mm) and when to skip it

Only ``manifest``, ``engine``, ``dependencies``, ``slicer_versions`` and ``selftest`` avoid MRML; the others need ``import slicer`` (the desktop's, or
PyPI ``slicer-core``).
"""
