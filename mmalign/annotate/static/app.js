// Keyboard shortcuts for pairwise choices: 1 / 2 choose, t ties. The forms work without this file.
document.addEventListener("keydown", function (event) {
  if (event.target && ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName)) return;
  const button = document.querySelector('button.choice[data-key="' + event.key + '"]');
  if (button) button.click();
});

// A waveform under each audio player: the file decoded in the browser (Web Audio) and drawn as its min/max per
// pixel column, so that annotators see loudness and silences before they listen. Nothing else is fetched.
function drawWaveform(audio) {
  const canvas = document.createElement("canvas");
  canvas.className = "waveform";
  canvas.width = 400;
  canvas.height = 60;
  audio.insertAdjacentElement("afterend", canvas);
  fetch(audio.currentSrc || audio.src, { credentials: "same-origin" })
    .then(function (response) { return response.arrayBuffer(); })
    .then(function (bytes) { return new OfflineAudioContext(1, 1, 8000).decodeAudioData(bytes); })
    .then(function (buffer) {
      const samples = buffer.getChannelData(0);
      const context = canvas.getContext("2d");
      const step = Math.max(1, Math.floor(samples.length / canvas.width));
      const middle = canvas.height / 2;
      context.fillStyle = "#356";
      for (let x = 0; x < canvas.width; x++) {
        let low = 1, high = -1;
        for (let i = x * step; i < Math.min(samples.length, (x + 1) * step); i++) {
          low = Math.min(low, samples[i]);
          high = Math.max(high, samples[i]);
        }
        if (high < low) continue;
        context.fillRect(x, middle - high * middle, 1, Math.max(1, (high - low) * middle));
      }
      canvas.dataset.drawn = "1";
    })
    .catch(function () { canvas.dataset.drawn = "error"; });
}
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll(".option audio").forEach(drawWaveform);
});
