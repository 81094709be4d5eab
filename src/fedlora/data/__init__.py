"""Data: offline generators, local/hub sources, partitioners and partition reports."""
