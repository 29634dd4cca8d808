"""Media I/O through ffmpeg: probing, streaming decode and encode, hardware codecs, thumbnails, sample media."""
