"""Data every task uses: rows of local files and hub datasets (sources), partitioners and partition reports."""
