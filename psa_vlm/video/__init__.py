"""Video inputs: the synthetic long-video QA generator (``psa_vlm.video.synth``)."""
