"""Face features: landmarks, aligned crops, emotion and appearance features."""
