"""Local HTTP stand-ins for the services the tests talk to (Gemini, the Hugging Face Hub)."""
