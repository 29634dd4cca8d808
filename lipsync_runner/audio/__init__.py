"""Audio: PCM windows for the Whisper encoder, speech activity, the output soundtrack."""
