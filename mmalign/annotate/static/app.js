// Keyboard shortcuts for pairwise choices: 1 / 2 choose, t ties. The forms work without this file.
document.addEventListener("keydown", function (event) {
  if (event.target && ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName)) return;
  const button = document.querySelector('button.choice[data-key="' + event.key + '"]');
  if (button) button.click();
});
