"""Subprocess capture: run one command, stream its output as lines, stop it cleanly.

* :mod:`runstream.runner.lines` — :class:`~runstream.runner.lines.LineSplitter`,
  a sans-I/O splitter turning pipe bytes into
  :class:`~runstream.runner.lines.OutputLine` records (UTF-8 with replacement,
  bounded line length, ``\\r`` progress bars, timer flush, log levels), also
  as compact :class:`~runstream.runner.lines.OutputBatch` sequences that
  :func:`~runstream.runner.lines.encode_runs` turns into event JSON in bulk.
* :mod:`runstream.runner.process` — :func:`~runstream.runner.process.run_process`,
  which runs an argv list (never a shell) in its own process group, drains
  stdout and stderr concurrently into batches for an async sink, and handles
  timeout, cancellation and leftover processes with one kill path.

This layer knows nothing about runs, streams or HTTP; the runs layer turns
the records into ``stdout``/``stderr`` events whose data is
:meth:`~runstream.runner.lines.OutputLine.to_data` (see
:func:`runstream.runs.executor.output_sink`).
"""
