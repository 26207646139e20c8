"""A run's folder: its layout (file names, ``{run_id}``), the recorder that writes it, the reader
that loads it back, the sweep report and the figures."""
