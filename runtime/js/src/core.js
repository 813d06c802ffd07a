// Everything that does not depend on the ONNX Runtime build: store, metadata, errors and the
// classifier (which is handed the onnxruntime module). The Node and browser entry points
// (node.js, web.js) re-export this with a `create` that supplies ONNX Runtime.
export { EdgemetaError, InputError, ModelMismatchError, StoreCorruptError, StoreWriteError } from './errors.js';
export { FORMAT_NAME, FORMAT_VERSION, PrototypeStore, checkLabel } from './store.js';
export { METADATA_KEY, modelMetadata, parseMetadata, readMetadataProps } from './metadata.js';
export { FewShotClassifier, INPUT_IMAGES, INPUT_PIXELS, PIXELS_EXPORT } from './classifier.js';
