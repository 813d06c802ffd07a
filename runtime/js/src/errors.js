// The one exception hierarchy of the JavaScript runtime, the same names as the Python
// runtime's (runtime/errors.py): every message names the bad value and the fix.

/** Base class of every error the runtime raises on bad input or bad files. */
export class EdgemetaError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** A user-supplied value (image, label, option) is invalid. */
export class InputError extends EdgemetaError {}

/** Two artefacts (model, store) come from different models, or a model breaks the contract. */
export class ModelMismatchError extends EdgemetaError {}

/** A prototype store file is truncated, tampered with, or of an unknown format. */
export class StoreCorruptError extends EdgemetaError {}

/** A prototype store could not be written; the previous file is intact. */
export class StoreWriteError extends EdgemetaError {}
