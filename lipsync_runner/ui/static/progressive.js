// Plays a running job's progressive output: the HLS playlist of fMP4 segments at
// /api/lip-sync/jobs/<id>/live.m3u8 that grows as the job renders (docs/api.md, "Progressive output").
//
//   const player = window.LipSyncProgressive.attach(videoEl, playlistUrl, token);  // token may be ""
//   player.detach();  // stop loading and free the media source
//
// hls.js (vendored: vendor/hls.light.min.js, Apache-2.0, see vendor/hls.js-LICENSE) plays it through
// Media Source Extensions and sends "Authorization: Bearer <token>" with every request (xhrSetup).
// Its web worker is off: the page's CSP allows no blob: workers, and a 2 s segment transmuxes nothing
// (fMP4 goes to MSE as it is). A browser without MSE but with native HLS (iOS Safari) plays the
// playlist itself; it cannot send a header, so there it works only when the service needs no token.
(function () {
  "use strict";

  function attach(video, playlistUrl, token) {
    const Hls = window.Hls;
    if (Hls && Hls.isSupported()) {
      const hls = new Hls({
        enableWorker: false,
        lowLatencyMode: false,
        // an EVENT playlist: start at its beginning (the job's first frame), not at the live edge
        startPosition: 0,
        liveSyncDurationCount: 1,
        manifestLoadingMaxRetry: 6,
        levelLoadingMaxRetry: 6,
        fragLoadingMaxRetry: 6,
        xhrSetup(xhr) {
          if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
        },
      });
      hls.on(Hls.Events.ERROR, (_event, data) => {
        if (!data.fatal) return;
        if (data.type === Hls.ErrorTypes.MEDIA_ERROR) hls.recoverMediaError();
        else if (data.type === Hls.ErrorTypes.NETWORK_ERROR) hls.startLoad();
      });
      hls.loadSource(playlistUrl);
      hls.attachMedia(video);
      return { hls, detach() { hls.destroy(); } };
    }
    if (video.canPlayType("application/vnd.apple.mpegurl")) {
      video.src = playlistUrl;  // native HLS: no way to add a header (works without a token only)
      return { hls: null, detach() { video.removeAttribute("src"); video.load(); } };
    }
    return null;  // neither: the page shows the MP4 once the job is done
  }

  window.LipSyncProgressive = { attach };
})();
