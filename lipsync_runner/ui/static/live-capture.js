// AudioWorklet: hands the page each block of mono samples (at the context's rate: 16 kHz).
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("lipsync-capture", Capture);
