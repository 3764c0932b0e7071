"""Driver side of steerscale: sweep spec -> grid of cells -> Ray scheduling -> results store."""
