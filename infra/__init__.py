"""What the stages run on: storage for paths and bucket URIs, the Ray edge, the run directory and its layout, tracking, config loading."""
