"""BentoML assembly: the service core, the job executor, the GPU runner core and its remote client."""
