// Throws before it ever listens.
throw new Error('boom at start');
